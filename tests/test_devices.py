"""Your model, your device: any local HF directory or cached hub id, on --device/--dtype, with real generation.

CPU tests run everywhere. The CUDA tests are skipped without a GPU and must pass where one exists: the model
on one GPU in its config's dtype, and a model split over a GPU and the CPU by accelerate, with hooks, signals,
forced exits and DEER trials all working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from monitor import models as M
from monitor.backends.hf import HFMonitoredGenerator
from monitor.cli import main
from monitor.config import RunConfig
from monitor.decision import DeerPolicy
from monitor.models import load_model, resolve_device, resolve_placement, tiny_tokenizer
from monitor.models.files import dir_fingerprint
from monitor.run import run_problems
from monitor.trace import read_traces

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QWEN_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_qwen2_dir(root: Path, dtype: str = "bfloat16", name: str = "qwen2-random") -> Path:
    """A randomly initialised Qwen2 checkpoint directory as a user has one: config.json (asking for `dtype`),
    safetensors weights, tokenizer files with a ChatML chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    tok.chat_template = QWEN_CHATML
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    d = root / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype
    return d


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return make_qwen2_dir(tmp_path_factory.mktemp("models"))


# ----------------------------------------------------------------------------------------------- placement
def test_auto_is_float32_on_cpu_and_the_config_dtype_on_a_gpu(monkeypatch):
    bf16 = {"torch_dtype": "bfloat16"}
    assert resolve_placement("cpu", "auto", bf16) == M.Placement("cpu", torch.float32)
    assert resolve_placement("cpu", "bfloat16", bf16).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_placement("auto", "auto", bf16) == M.Placement("auto", torch.bfloat16)
    assert resolve_placement("cuda:1", "auto", {"dtype": "float16"}) == M.Placement("cuda:1", torch.float16)
    assert resolve_placement("cuda", "auto", {"torch_dtype": "float32"}).dtype == torch.float32
    assert resolve_placement("cuda", "auto", None) == M.Placement("cuda:0", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4
    assert resolve_placement("cuda", "auto", bf16).dtype == torch.float16
    with pytest.raises(M.ModelNotAvailable, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_how_to_get_one():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(M.ModelNotAvailable, match="install torch from the CUDA index"):
        resolve_device("cuda")


@pytest.mark.parametrize("device,dtype,needle", [("gpu", "auto", "--device must be cpu, cuda, cuda:N or auto"),
                                                 ("cuda:x", "auto", "cuda:N"),
                                                 ("cpu", "int8", "dtype must be")])
def test_bad_device_or_dtype_is_refused_before_loading(device, dtype, needle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=needle):
        load_model("tiny-random", device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- local dirs
def test_local_qwen2_directory_loads_in_auto_placement_and_generates(qwen2_dir):
    lm = load_model(str(qwen2_dir), device="auto", dtype="auto")
    want = "auto" if torch.cuda.is_available() else "cpu"
    assert lm.model.dtype == (torch.bfloat16 if want == "auto" else torch.float32)
    assert lm.family.name == "think" and lm.info["dtype"] in ("float32", "bfloat16")
    traces = run_problems(lm, [{"id": "q", "question": "What is 2 + 3?", "answer": "5"}],
                          RunConfig(halt_after=6, max_new_tokens=12, answer_max_tokens=4))
    (t,) = traces
    assert t.decision["halted"] and t.accounting["reasoning"] == 6 and t.accounting["answer"] >= 1
    assert t.meta["model_info"]["dtype"] == lm.info["dtype"] and t.meta["reasoning_format"] == "think"
    assert len(t.signals["jsd_instability"]["jsd"]) == 6


def test_cli_runs_a_local_directory_with_device_and_dtype_auto(qwen2_dir, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    code = main(["run", "--model", str(qwen2_dir), "--device", "auto", "--dtype", "auto", "--question", "What is 2+3?",
                 "--halt-after", "5", "--max-new-tokens", "10", "--answer-max-tokens", "3", "--trace", str(trace),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (t,) = read_traces(trace)
    assert t.model == "qwen2-random" and t.decision["halted"]
    assert json.loads(out)["traces"][0]["decision"]["halted"] is True


def test_weights_false_builds_the_architecture_without_memory(qwen2_dir):
    lm = load_model(str(qwen2_dir), weights=False)
    assert next(lm.model.parameters()).device.type == "meta"
    assert lm.n_layers == 4 and lm.fingerprint == dir_fingerprint(qwen2_dir)


def test_model_split_across_devices_by_accelerate_generates_with_hooks_trials_and_exits(qwen2_dir, tmp_path):
    """A model split by a device map (here: two layers offloaded to disk, streamed in by accelerate's hooks on
    the CPU): our forward hooks, signals, DEER trials and the forced exit work on it, token for token as on the
    unsplit model."""
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    whole = load_model(str(qwen2_dir), device="cpu", dtype="float32")
    outs = []
    for model in (whole.model, split):
        cfg = RunConfig(max_new_tokens=16, answer_max_tokens=4, min_step_tokens=2)
        factory = cfg.monitor_factory([0, 1, 2, 3], "</think>", lambda: DeerPolicy(0.0 + 1e-9, max_trial_tokens=3,
                                                                                    kinds=("cue", "step_end")))
        gen = HFMonitoredGenerator(model, whole.tokenizer, factory, layers=[0, 1, 2, 3],
                                   exit_cue=whole.family.exit_cue, answer_max_tokens=4)
        try:
            outs.append(gen.generate([whole.family.build_prompt(whole.tokenizer, "Wait, what is 2 + 3?")] * 2,
                                     max_new_tokens=16))
        finally:
            gen.close()
    for a, b in zip(*outs):
        assert a.output_text == b.output_text and a.stop_reason == b.stop_reason
        ta, tb = a.monitor.to_trace(trace_id="x", model="m", backend="hf", question="q", prompt="", prompt_tokens=0,
                                    answer_text="", answer=None, gold=None, correct=None), \
            b.monitor.to_trace(trace_id="x", model="m", backend="hf", question="q", prompt="", prompt_tokens=0,
                               answer_text="", answer=None, gold=None, correct=None)
        assert ta.tokens["ids"] == tb.tokens["ids"]
        for fam in ("jsd_instability", "latent_trajectory"):
            for key, series in ta.signals[fam].items():
                assert series == pytest.approx(tb.signals[fam][key], rel=1e-4, abs=1e-5, nan_ok=True), (fam, key)


# ----------------------------------------------------------------------------------------------- hub ids
def _fake_hub_cache(cache: Path, repo: str, src: Path) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    import shutil

    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = folder / "snapshots" / commit
    shutil.copytree(src, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_loads_from_the_local_cache_offline(qwen2_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "someorg/qwen2-random", qwen2_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    lm = load_model("someorg/qwen2-random", device="cpu")
    assert lm.name == "someorg/qwen2-random" and lm.info["path"] == str(snap)
    assert lm.fingerprint == dir_fingerprint(qwen2_dir)


def test_missing_hub_id_offline_says_exactly_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.ModelNotAvailable) as e:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "Unset HF_HUB_OFFLINE" in msg
    assert "local_files_only" not in msg


def test_cli_does_not_force_hub_offline(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["signals", "--json"]) == 0
    capsys.readouterr()
    assert "HF_HUB_OFFLINE" not in os.environ


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"overthink {version('overthink')}"


def test_the_cli_parser_and_help_start_without_torch():
    """`overthink --help` and every subcommand's parser build without importing torch or transformers (they were
    1-3.6 s of imports before anything was parsed); `monitor.models` loads its submodules on first use, and a
    dtype name still becomes a torch dtype when one is asked for."""
    import subprocess
    import sys

    code = ("import sys; from monitor.cli import build_parser; p = build_parser(); "
            "p.parse_args(['run', '--model', 'm', '--question', 'q', '--dtype', 'bfloat16']); "
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules)); "
            "from monitor.models import dtype_name, DTYPES; print(DTYPES, dtype_name('bf16'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().splitlines()
    assert before == "[]"
    assert after == "('auto', 'bfloat16', 'float16', 'float32') bfloat16"
    assert M.resolve_placement("cpu", "bf16").dtype is torch.bfloat16
    assert "load_model" in dir(M)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        M.nope  # noqa: B018


# ----------------------------------------------------------------------------------------------- CUDA
@cuda
def test_cuda_one_gpu_in_the_config_dtype_with_hooks_signals_and_exit(qwen2_dir):
    lm = load_model(str(qwen2_dir), device="cuda", dtype="auto")
    assert lm.model.device.type == "cuda" and lm.model.dtype in (torch.bfloat16, torch.float16)
    (t,) = run_problems(lm, [{"id": "q", "question": "Wait, what is 2 + 3?", "answer": "5"}],
                        RunConfig(halt_after=8, max_new_tokens=16, answer_max_tokens=4))
    assert t.decision["halted"] and t.accounting["forced"] > 0 and not t.errors
    assert all(v is not None for v in t.signals["jsd_instability"]["jsd"])


@cuda
def test_cuda_model_split_over_gpu_and_cpu_matches_the_whole_model(qwen2_dir):
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
                  "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32, device_map=device_map).eval()
    whole = load_model(str(qwen2_dir), device="cpu", dtype="float32")
    res = []
    for model in (whole.model, split):
        cfg = RunConfig(max_new_tokens=12, answer_max_tokens=3, min_step_tokens=2)
        factory = cfg.monitor_factory([0, 3], "</think>", lambda: DeerPolicy(1e-9, max_trial_tokens=3,
                                                                              kinds=("cue", "step_end")))
        gen = HFMonitoredGenerator(model, whole.tokenizer, factory, layers=[0, 3], exit_cue=whole.family.exit_cue,
                                   answer_max_tokens=3)
        try:
            res.append(gen.generate([whole.family.build_prompt(whole.tokenizer, "Wait, 2 + 3?")], max_new_tokens=12))
        finally:
            gen.close()
    assert res[0][0].output_text == res[1][0].output_text


# ----------------------------------------------------------------------------------------------- vLLM options
def test_vllm_engine_options_pass_through_to_the_engine(monkeypatch, qwen2_dir):
    """--tensor-parallel-size, --gpu-memory-utilization, --max-model-len, --dtype and --enforce-eager reach
    `make_llm` (and from there `vllm.LLM`) unchanged; the hidden tap keeps eager mode, --no-hidden leaves it to vLLM."""
    from monitor import run as R
    from monitor.backends import vllm_engine as V

    seen: list[dict] = []
    monkeypatch.setattr(V, "make_llm", lambda model_dir, **kw: seen.append({"dir": model_dir, **kw}) or "engine")
    lm = load_model(str(qwen2_dir), weights=False)
    cfg = RunConfig(backend="vllm", vllm_hidden=False, tensor_parallel_size=2, gpu_memory_utilization=0.8,
                    max_model_len=2048, dtype="bfloat16", enforce_eager=False)
    cfg.validate()
    assert R.build_vllm_engine(lm, cfg) == "engine"
    kw = seen[-1]
    assert Path(kw["dir"]) == qwen2_dir and kw["hidden"] is False
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["max_model_len"], kw["dtype"],
            kw["enforce_eager"]) == (2, 0.8, 2048, "bfloat16", False)
    R.build_vllm_engine(lm, RunConfig(backend="vllm"))
    assert "enforce_eager" not in seen[-1] and "gpu_memory_utilization" not in seen[-1]
    assert seen[-1]["max_model_len"] == 1024  # the model's own context (under both caps)
    with pytest.raises(ValueError, match="hidden-state tap needs eager mode"):
        RunConfig(backend="vllm", enforce_eager=False).validate()
    kwargs = V._engine_kwargs(qwen2_dir, hidden=True, max_model_len=64, seed=0, dtype="auto", max_logprobs=20,
                              extra={"tensor_parallel_size": 2})
    assert kwargs["enforce_eager"] is True and kwargs["tensor_parallel_size"] == 2
    assert kwargs["dtype"] == ("auto" if torch.cuda.is_available() else "float32")


def test_vllm_cli_flags_are_parsed(capsys):
    from monitor.cli import build_parser

    args = build_parser().parse_args(["run", "--backend", "vllm", "--model", "m", "--question", "q",
                                      "--tensor-parallel-size", "4", "--gpu-memory-utilization", "0.9",
                                      "--max-model-len", "8192", "--dtype", "float16", "--no-enforce-eager",
                                      "--no-hidden"])
    assert (args.tensor_parallel_size, args.gpu_memory_utilization, args.max_model_len, args.dtype,
            args.enforce_eager, args.no_hidden) == (4, 0.9, 8192, "float16", False, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--model", "m", "--question", "q", "--gpu-memory-utilization", "1.5"])
    assert "fraction in (0, 1]" in capsys.readouterr().err


def test_problems_without_ids_get_one_id_each_within_a_batch():
    """The default trace id is the problem's place in the run ("q0", "q1", ...), not its batch's."""
    from monitor.config import RunConfig

    lm = load_model("tiny-random")
    qs = [{"question": f"What is {i} + 1?"} for i in range(5)]
    traces = run_problems(lm, qs, RunConfig(batch_size=2, max_new_tokens=4, answer_max_tokens=2))
    assert [t.id for t in traces] == ["q0", "q1", "q2", "q3", "q4"]
