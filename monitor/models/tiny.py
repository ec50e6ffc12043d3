"""tiny-random: a tiny randomly initialised Llama and a byte-level BPE tokenizer trained in-process on a fixed
corpus. No download at all: what the tests, the CPU examples and overhead checks at tiny sizes load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any

import torch

from monitor.formats import THINK_END, THINK_START
from monitor.models.files import short_digest

log = logging.getLogger("overthink.models")

EOS = "<|endoftext|>"


TINY_CORPUS: tuple[str, ...] = (
    "Question: Tom has 4 apples and eats one. How many apples are left?",
    "Tom starts with 4 apples. He eats 1 apple, so 4 - 1 = 3 apples are left.",
    "Wait, let me check that again. 4 - 1 = 3. Yes, so the answer is 3.",
    "**Final Answer**: \\boxed{3}",
    "Question: A shop sells 12 pens a day. How many pens does it sell in 7 days?",
    "Each day the shop sells 12 pens, so in 7 days it sells 12 * 7 = 84 pens.",
    "Hmm, 12 * 7 is 84 because 10 * 7 = 70 and 2 * 7 = 14, and 70 + 14 = 84.",
    "\n\n**Final Answer**: \\boxed{84}",
    "<think>\nLet me think step by step.\n\nFirst, find the total cost.\n</think>",
    "Alternatively, we can add the numbers in a different order: 25 + 17 = 42.",
    "But wait, the problem asks for the difference, not the sum. So 25 - 17 = 8.",
    "hmm, that does not look right. Let me recompute: 48 / 6 = 8.",
    "We await the result of the second step before we continue.",
    "So the total is 3 + 5 + 9 = 17, and half of 17 is 8.5.",
    "Question: Sara reads 15 pages every day. How many days does she need for 90 pages?",
    "She needs 90 / 15 = 6 days.\n\nWait, is that right? 15 * 6 = 90. Yes.\n\n**Final Answer**: \\boxed{6}",
    "Alternatively, count up by 15: 15, 30, 45, 60, 75, 90. That is 6 days.",
    "But the price went up by 20 percent, so the new price is 50 * 1.2 = 60 dollars.",
    "so the answer is 60.\n\n**Final Answer**: \\boxed{60}",
    "Question: John has twice as many marbles as Ann. Ann has 13 marbles. How many do they have together?",
    "John has 2 * 13 = 26 marbles. Together they have 26 + 13 = 39 marbles.",
    "wait, I should double check: 26 + 13 = 39. Good.",
    "Hmm, let me reconsider the units. The speed is 60 km per hour for 2.5 hours, so 150 km.",
    "Alternatively, 60 * 2 = 120 and 60 * 0.5 = 30, so 120 + 30 = 150.",
    "<think>\nThe train leaves at 9 and arrives at 11, so it travels 2 hours.\n\nBut it stops for 15 minutes.\n</think>",
    "Therefore the answer is \\boxed{105} minutes.",
    "Let x be the number of cats. Then x + 2x = 18, so 3x = 18 and x = 6.",
    "Wait, the question asks for dogs, which is 2x = 12.\n\n**Final Answer**: \\boxed{12}",
    "The area of a rectangle with sides 7 and 8 is 7 * 8 = 56 square meters.",
    "The perimeter is 2 * (7 + 8) = 30 meters. So the answer is 30.",
    "Question: What is 2 + 3?\nAnswer: Let's think step by step.\n2 + 3 = 5.\n\n**Final Answer**: \\boxed{5}",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Hmm. Hmm, hmm. Wait. Wait, wait. Alternatively. But. So. await. awaited.",
    "First, 100 - 35 = 65. Then 65 / 5 = 13. So each friend gets 13 stickers.",
    "We need 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    "The remainder when 47 is divided by 5 is 2, since 5 * 9 = 45 and 47 - 45 = 2.",
    "But we also have to include the tax of 8 dollars, so 92 + 8 = 100 dollars in total.",
    "So, the final answer is \\boxed{100}.\n\n",
    "Step 1: read the problem. Step 2: write the equation. Step 3: solve it. Step 4: check it.",
    "Let me verify. If she had 40 cookies and gave away 3/4 of them, she has 40 / 4 = 10 left.",
)

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>" + THINK_START + "\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab: int) -> str:
    """Train the tiny byte-level BPE once per process; returns its JSON (deterministic: fixed corpus, and the
    trainer breaks count ties by pair id)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab < 300:
        raise ValueError(f"vocab must be >= 300 (256 byte symbols + specials + merges); got {vocab}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tk.train_from_iterator(list(TINY_CORPUS) * 2, trainer=trainer)
    # like R1 distills / Qwen3: the think markers are single added tokens that decoding keeps
    tk.add_tokens([AddedToken(THINK_START, special=False, normalized=False),
                   AddedToken(THINK_END, special=False, normalized=False)])
    return tk.to_str()


def tiny_tokenizer(vocab: int = 512) -> Any:
    """A fresh PreTrainedTokenizerFast over the (cached) trained tiny BPE; callers may mutate it freely."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab)),
                                  eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _tiny_config_kwargs(tok: Any, layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def tiny_model_and_tokenizer(seed: int = 0, vocab: int = 512, layers: int = 4) -> tuple[Any, Any]:
    """A tiny random LlamaForCausalLM (hidden 128, 2 heads of 64, `layers` layers) and its tokenizer.

    Deterministic: the same arguments give the same weights and token ids in every process. The global torch
    RNG state is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab)
    config = LlamaConfig(**_tiny_config_kwargs(tok, layers))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tok


def tiny_fingerprint(seed: int, vocab: int, layers: int) -> str:
    tok_json = _tiny_tokenizer_json(vocab)
    h = hashlib.sha256(b"overthink-fp-v1:tiny-random\0")
    kw = _tiny_config_kwargs(tiny_tokenizer(vocab), layers)
    h.update(json.dumps({"config": kw, "seed": seed, "arch": "LlamaForCausalLM"}, sort_keys=True).encode())
    h.update(hashlib.sha256(tok_json.encode()).digest())
    return short_digest(h)
