"""`overthink bench overhead`: tokens/s of plain vs monitored generation, measured in one process.

Plain = `model.generate` with no hooks at all. Monitored = the HF backend with all four signal families
and three hooked decoder layers, observe-only policy (so both runs write the same tokens). Both runs are
forced to the same length (`min_new_tokens`), alternate (plain, monitored, plain, ...) to spread
machine noise evenly, and the ratio of median tokens/s is reported. A benchmark, not a test.

It also reports what monitoring adds to each decoding step, in milliseconds (`added_ms_per_step`: the median
monitored step time minus the median plain one, a step being one token for every row of the batch), and per
token (`added_us_per_token`). On a small model that is the monitor's host cost (its kernels are tiny), the
figure that carries over to a GPU: a step of T ms there runs at about T / (T + added) of plain throughput.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from monitor.config import RunConfig
from monitor.models import LoadedModel, decoder_layers, model_device
from monitor.problems import load_problems


@dataclass
class OverheadResult:
    model: str
    batch_size: int
    new_tokens: int
    repeats: int
    plain_tokens_per_s: float
    monitored_tokens_per_s: float
    throughput_ratio: float
    layers: list[int]
    plain_runs: list[float]
    monitored_runs: list[float]
    torch_threads: int
    plain_ms_per_step: float = 0.0  # batch / plain tokens/s (medians), in ms
    monitored_ms_per_step: float = 0.0
    added_ms_per_step: float = 0.0  # monitored - plain: what monitoring adds to each decoding step
    added_us_per_token: float = 0.0  # added_ms_per_step / batch, in microseconds


# Used when no --data is given, so the benchmark needs no data file.
BUILTIN_QUESTIONS = [
    "A baker makes 24 muffins and sells them in boxes of 4. Each box costs $6. How much money does she make?",
    "Tom reads 15 pages a day. His book has 240 pages. How many days does he need to finish it?",
    "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How far does it go?",
    "Sara has 3 times as many marbles as Ben. Together they have 48 marbles. How many marbles does Sara have?",
]


def three_layers(n: int) -> list[int]:
    return sorted({n // 4, n // 2, n - 1})


def _prompts(lm: LoadedModel, data_path: str | None, n: int) -> list[str]:
    """`n` rendered prompts: the first questions of `data_path`, else the built-in ones (repeated as needed)."""
    if data_path:
        questions = [p["question"] for p in load_problems(data_path, limit=n)]
    else:
        questions = (BUILTIN_QUESTIONS * n)[:n]
    return [lm.family.build_prompt(lm.tokenizer, q) for q in questions]


@torch.no_grad()
def bench_overhead(lm: LoadedModel, data_path: str | None = None, new_tokens: int = 64, batch_size: int = 1,
                   repeats: int = 3, on_phase: Callable[[str], None] = lambda what: None) -> OverheadResult:
    """Plain `model.generate` against monitored generation (all four families), `repeats` times each, alternating;
    `on_phase` is told what is being timed at each step (the CLI's status line)."""
    from monitor.backends.hf import HFMonitoredGenerator, prepare_tokenizer

    if new_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("--new-tokens, --batch-size and --repeats must be positive integers")
    prompts = _prompts(lm, data_path, batch_size)
    tok = prepare_tokenizer(lm.tokenizer)
    layers = three_layers(len(decoder_layers(lm.model)))
    cfg = RunConfig(max_new_tokens=new_tokens)
    factory = cfg.monitor_factory(layers, lm.family.think_end)
    greedy: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    dev = model_device(lm.model)  # the plain run's inputs go where the monitored run puts them
    enc = {k: v.to(dev) for k, v in tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).items()}

    def plain() -> float:
        t0 = time.perf_counter()
        out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=tok.pad_token_id, **greedy)
        dt = time.perf_counter() - t0
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts) / dt

    def monitored() -> float:
        gen = HFMonitoredGenerator(lm.model, tok, factory, layers=layers, exit_cue=lm.family.exit_cue)
        gen.exit_at_budget = False
        try:
            t0 = time.perf_counter()
            res = gen.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            dt = time.perf_counter() - t0
        finally:
            gen.close()
        n = sum(r.monitor.n_tokens for r in res)
        return n / dt

    on_phase(f"warm-up: plain model.generate, batch {len(prompts)} x {new_tokens} tokens (not timed)")
    plain()  # warm-up (allocator, kernels) not timed
    p_runs, m_runs = [], []
    for i in range(repeats):
        on_phase(f"timing plain model.generate, batch {len(prompts)} x {new_tokens} tokens (run {i + 1}/{repeats})")
        p_runs.append(plain())
        on_phase(f"timing monitored generation, 4 signal families on layers {layers} (run {i + 1}/{repeats})")
        m_runs.append(monitored())
    p, m = statistics.median(p_runs), statistics.median(m_runs)
    b = len(prompts)
    p_ms, m_ms = 1e3 * b / p, 1e3 * b / m
    return OverheadResult(model=lm.name, batch_size=len(prompts), new_tokens=new_tokens, repeats=repeats,
                          plain_tokens_per_s=round(p, 3), monitored_tokens_per_s=round(m, 3),
                          throughput_ratio=round(m / p, 4), layers=layers,
                          plain_runs=[round(x, 3) for x in p_runs], monitored_runs=[round(x, 3) for x in m_runs],
                          torch_threads=torch.get_num_threads(), plain_ms_per_step=round(p_ms, 3),
                          monitored_ms_per_step=round(m_ms, 3), added_ms_per_step=round(m_ms - p_ms, 3),
                          added_us_per_token=round(1e3 * (m_ms - p_ms) / b, 2))


@dataclass
class VLLMThroughputResult:
    model: str
    requests: int
    new_tokens: int
    repeats: int
    layers: list[int]
    logprobs: int
    plain_tokens_per_s: float
    logprob_monitored_tokens_per_s: float
    hidden_monitored_tokens_per_s: float
    logprob_ratio: float  # monitored (logprob signals only) / plain
    hidden_ratio: float  # monitored (all four families, hidden-state tap) / plain
    runs: dict[str, list[float]]


def bench_vllm(lm: LoadedModel, requests: int = 16, new_tokens: int = 128, repeats: int = 2,
               logprobs: int = 20, data_path: str | None = None, dtype: str = "auto",
               on_phase: Callable[[str], None] = lambda what: None, **engine_kwargs: Any) -> VLLMThroughputResult:
    """`overthink bench vllm`: N concurrent requests through one vLLM engine, three ways, alternating:
    plain `LLM.generate` (no logprobs), monitored with the logprob signals only (path deviation, JSD), and
    monitored with all four families (hidden-state tap on three layers). Every run decodes exactly
    `new_tokens` per request (EOS ignored, observe-only policy), so tokens/s compare like for like. One
    engine serves all three (built by `make_llm` with eager mode, which the hidden-state tap needs)."""
    from vllm import SamplingParams

    from monitor.backends.vllm import VLLMMonitoredGenerator
    from monitor.backends.vllm_engine import export_for_vllm, make_llm, shutdown_llm
    from monitor.signals import JSDInstability, PathDeviation

    if requests < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError("--requests, --new-tokens and --repeats must be positive integers")
    prompts = _prompts(lm, data_path, requests)
    prompt_ids = [lm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    layers = three_layers(len(decoder_layers(lm.model)))
    on_phase("starting the vLLM engine (export, load, warm-up)")
    llm = make_llm(export_for_vllm(lm), hidden=True, max_logprobs=max(20, logprobs), dtype=dtype,
                   max_model_len=min(4096, max(len(x) for x in prompt_ids) + new_tokens + 128), **engine_kwargs)
    cfg = RunConfig(max_new_tokens=new_tokens)
    try:
        def plain() -> float:
            sp = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": x} for x in prompt_ids], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            return sum(len(o.outputs[0].token_ids) for o in outs) / dt

        def monitored(hidden: bool) -> float:
            if hidden:
                factory = cfg.monitor_factory(layers, lm.family.think_end)
            else:
                def factory() -> Any:
                    from monitor.monitor import Monitor

                    return Monitor(signals=[PathDeviation(), JSDInstability()])
            gen = VLLMMonitoredGenerator(llm, lm.tokenizer, factory, layers=layers if hidden else [],
                                         exit_cue=lm.family.exit_cue, hidden=hidden, logprobs=logprobs,
                                         exit_at_budget=False)
            t0 = time.perf_counter()
            res = gen.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
            dt = time.perf_counter() - t0
            return sum(r.monitor.n_tokens for r in res) / dt

        what = f"{len(prompts)} requests x {new_tokens} tokens"
        on_phase(f"warm-up: plain LLM.generate, {what} (not timed)")
        plain()  # warm-up, not timed
        runs: dict[str, list[float]] = {"plain": [], "logprob": [], "hidden": []}
        for i in range(repeats):
            on_phase(f"timing plain LLM.generate, {what} (run {i + 1}/{repeats})")
            runs["plain"].append(plain())
            on_phase(f"timing monitored, logprob signals only (top-{logprobs}), {what} (run {i + 1}/{repeats})")
            runs["logprob"].append(monitored(False))
            on_phase(f"timing monitored, all four families + hidden-state tap, {what} (run {i + 1}/{repeats})")
            runs["hidden"].append(monitored(True))
    finally:
        shutdown_llm(llm)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return VLLMThroughputResult(
        model=lm.name, requests=len(prompts), new_tokens=new_tokens, repeats=repeats, layers=layers,
        logprobs=logprobs, plain_tokens_per_s=round(med["plain"], 3),
        logprob_monitored_tokens_per_s=round(med["logprob"], 3), hidden_monitored_tokens_per_s=round(med["hidden"], 3),
        logprob_ratio=round(med["logprob"] / med["plain"], 4), hidden_ratio=round(med["hidden"] / med["plain"], 4),
        runs={k: [round(x, 3) for x in v] for k, v in runs.items()})
