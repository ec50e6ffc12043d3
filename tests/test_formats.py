"""Reasoning formats: recognised from chat templates and configs, each with a working end marker and exit cue.

The templates below reproduce what identifies each family's real chat template (the R1 template's full-width
`<｜Assistant｜>`, Qwen3's `enable_thinking`, QwQ's ChatML generation prompt that opens `<think>`, gpt-oss's
harmony channels); the tokenizer is the tiny in-process one, with the family's marker tokens added.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken

from monitor.backends.hf import HFMonitoredGenerator
from monitor.cues import CueDetector
from monitor.formats import FORMATS, R1_ASSISTANT, detect_format, get_format, validate_messages
from monitor.models import tiny_model_and_tokenizer, tiny_tokenizer
from monitor.monitor import Monitor

R1_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<\uff5cUser\uff5c>{{ m['content'] }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}" + R1_ASSISTANT + "<think>\n{% endif %}")
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWQ_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
GPT_OSS_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
                    "{# channels: <|channel|>analysis / <|channel|>final #}")
QWEN25_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

GPT_OSS_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]


def _tokenizer(template: str | None, extra: list[str] | None = None):
    tok = tiny_tokenizer()
    if extra:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    tok.chat_template = template
    return tok


class _PlainVocab:
    """A plain instruct model's tokenizer as detect_format sees it: a ChatML template, no think tokens."""

    chat_template = QWEN25_TEMPLATE
    added_tokens_decoder: dict = {}

    def get_vocab(self):
        return {"<|im_start|>": 0, "hello": 1}


class _Config:
    def __init__(self, model_type: str):
        self.model_type = model_type


@pytest.mark.parametrize("template,config,expected", [
    (R1_TEMPLATE, None, "deepseek-r1"),
    (QWEN3_TEMPLATE, None, "qwen3"),
    (QWEN25_TEMPLATE, _Config("qwen3"), "qwen3"),  # a Qwen3 checkpoint without its template
    (QWQ_TEMPLATE, None, "qwq"),
    (GPT_OSS_TEMPLATE, None, "gpt-oss"),
    (None, _Config("gpt_oss"), "gpt-oss"),
    (QWEN25_TEMPLATE, _Config("qwen2"), "think"),  # the vocabulary has </think>, no family marker
])
def test_format_is_recognised_from_template_and_config(template, config, expected):
    assert detect_format(_tokenizer(template), config).name == expected


def test_plain_chain_of_thought_when_there_is_no_reasoning_marker():
    fmt = detect_format(_PlainVocab(), _Config("qwen2"))
    assert fmt.name == "plain" and fmt.think_end is None
    assert fmt.exit_cue == "\n\n**Final Answer**: \\boxed{"
    assert fmt.exit_cue_for("text") == "\n\n**Final Answer**:\n"


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_has_an_end_marker_the_cue_detector_sees_and_an_exit_cue_that_closes_reasoning(name):
    fmt = FORMATS[name]
    for kind in ("math", "number", "choice", "code", "text"):
        cue = fmt.exit_cue_for(kind)
        assert cue.startswith(fmt.close)
        assert cue.endswith("\\boxed{") == (kind not in ("code", "text"))
    if fmt.think_end is None:
        return
    assert fmt.think_end in fmt.close  # forcing the exit writes the end marker itself
    det = CueDetector(think_end=fmt.think_end)
    pieces = ["So", " 6", " *", " 7", " =", " 42", "."] + [fmt.think_end[:3], fmt.think_end[3:]] + ["The"]
    ended_at = None
    for i, p in enumerate(pieces):
        pts = det.update(i, p)
        if any(pt.kind == "reasoning_end" for pt in pts):
            ended_at = i
    assert ended_at == 8 and det.reasoning_ended


def test_qwen3_prompt_turns_thinking_on_and_r1_prompt_opens_think():
    q3 = get_format("qwen3").build_prompt(_tokenizer(QWEN3_TEMPLATE), "What is 2 + 3?")
    assert q3.endswith("<|im_start|>assistant\n") and "</think>" not in q3  # enable_thinking=True: no empty think
    r1 = get_format("deepseek-r1").build_prompt(_tokenizer(R1_TEMPLATE), "What is 2 + 3?")
    assert r1.endswith(R1_ASSISTANT + "<think>\n") and "\\boxed{}" in r1


def test_prompt_by_answer_kind_system_and_messages():
    fmt, tok = FORMATS["qwq"], _tokenizer(QWQ_TEMPLATE)
    assert "\\boxed{}" in fmt.build_prompt(tok, "2+3?", kind="math")
    assert "letter of the correct option" in fmt.build_prompt(tok, "Pick one\n(A) x\n(B) y", kind="choice")
    code = fmt.build_prompt(tok, "Write fizzbuzz in Python.", kind="code", system="You write Python.")
    assert "\\boxed" not in code and code.startswith("<|im_start|>system\nYou write Python.<|im_end|>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    chat = fmt.build_prompt(tok, messages=msgs, system="ignored: the messages have a system message")
    assert chat.count("<|im_start|>system") == 1 and "Be brief." in chat and "\\boxed" not in chat


def test_plain_prompt_without_a_chat_template():
    fmt = FORMATS["plain"]
    tok = _tokenizer(None)
    assert fmt.build_prompt(tok, "2+3?", system="Be careful.").startswith("Be careful.\n\nQuestion: 2+3?")
    chat = fmt.build_prompt(tok, messages=[{"role": "user", "content": "hi"}])
    assert chat.startswith("User: hi") and chat.endswith("Assistant: Let's think step by step.\n")


def test_bad_format_name_and_bad_messages_say_what_to_do():
    with pytest.raises(ValueError, match="use one of: auto, gpt-oss"):
        get_format("r1")
    with pytest.raises(ValueError, match=r"messages\[0\].role is 'robot'"):
        validate_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty JSON list"):
        validate_messages({"role": "user"})
    with pytest.raises(ValueError, match=r"messages\[1\].content must be a string"):
        validate_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])


@pytest.mark.parametrize("name,extra", [("gpt-oss", GPT_OSS_TOKENS), ("qwen3", None), ("plain", None)])
@pytest.mark.parametrize("kind", ["math", "text"])
def test_forced_exit_writes_the_format_cue_and_the_answer_follows(name, extra, kind):
    """A real halt on the tiny model: the format's exit cue lands in the sequence after the decision token,
    then the answer phase runs (to the closing brace for boxed kinds, to the budget or EOS for free ones)."""
    from monitor.decision import HaltAfterPolicy

    model, _ = tiny_model_and_tokenizer(layers=2)
    tok = _tokenizer(QWEN25_TEMPLATE, extra=extra)
    if extra:
        model.resize_token_embeddings(len(tok))
    fmt = FORMATS[name]
    cue = fmt.exit_cue_for(kind)
    gen = HFMonitoredGenerator(model, tok, lambda: Monitor(signals=[], policy=HaltAfterPolicy(5),
                                                           cues=CueDetector(think_end=fmt.think_end)),
                               layers=[0], exit_cue=cue, answer_max_tokens=6)
    try:
        (r,) = gen.generate([fmt.build_prompt(tok, "What is 2 + 3?", kind=kind)], max_new_tokens=12)
    finally:
        gen.close()
    phases = r.monitor._tok_phase  # noqa: SLF001
    assert phases.count("reasoning") == 5
    forced = "".join(t for t, ph in zip(r.monitor.token_texts(), phases) if ph == "forced")
    assert forced == cue
    assert r.answer_text.startswith(cue) and 1 <= phases.count("answer") <= 6
    with torch.no_grad():
        assert r.monitor.decision is not None and r.monitor.decision.halt
