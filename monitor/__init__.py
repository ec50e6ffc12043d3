"""Overthink's online side: watch a reasoning model token by token and decide when to stop it.

Data flow (docs/README.md): backend --StepBatch (one token of each live sequence)--> MonitorBatch (each signal
once over the batch, on the model's device) --> each sequence's Monitor (cues, policy) --Decision--> backend;
Monitor --> Trace (JSON Lines) --> reports and benchmarks. A single sequence is a batch of one
(`Monitor.observe(TokenStep)`).

Where things live (the core first, then what drives it, then the application):
- events.py       StepBatch (what signals read), TokenStep (one sequence's token), Distribution
- signals/        one file per signal family (path deviation, JSD instability, latent trajectory, redundancy),
                  batch-first over per-sequence state tensors (signals/slots.py)
- batch.py        MonitorBatch: the batched hot path both backends drive
- cues.py         decision points: cue words, step ends, end of reasoning
- vocab.py        TokenTable: a tokenizer's vocabulary as text, once (decision points from token ids)
- decision.py     Decision and the halting policies
- monitor.py      Monitor: one sequence's record (columnar values), cues and policy; signals fail open
- checks.py       the fail-open checks of what a signal or policy returns
- trace.py        Trace record, schema validation, atomic JSON Lines IO (docs/trace-schema.md)
- io.py           one write discipline: atomic files, streamed JSON Lines, one-writer locks, output checks
- config.py       MonitorConfig: what every Monitor is built from (signals, layers, cues, policy, recording);
                  RunConfig: that plus a run's own settings (budgets, sampling, batching, engine flags)
- tasks.py        what one problem asks: answer kind, exit cue, answer budget, prompt, grade
- errors.py       UsageError, ModelNotAvailable; which exceptions are the user's (exit 2) and which are bugs
- backends/       sequence.py (what both backends share: exit plan, answer phase, EOS ids, the result),
                  hf.py (transformers), vllm.py (the vLLM drivers), vllm_engine.py (the engine built for them),
                  vllm_worker.py (inside vLLM's worker), detokenize.py (incremental detokenizer)
- models/         load.py (model specs -> LoadedModel), placement.py (devices, dtypes), files.py (the offline
                  models' files, fingerprints), tiny.py (tiny-random)
- formats.py      reasoning formats (R1, Qwen3, QwQ, gpt-oss, plain): end marker, exit cue, prompt
- bounds.py       context, prompt and memory bounds checked before a model loads
- answers.py      answer extraction and checking (GSM8K numbers, MATH LaTeX, multiple choice)
- problems.py     problem files (JSON Lines) and the answer kind a data set is graded with
- report/         diagnosis reports: data.py (plain data), panels.py / batch_panels.py (plotly), html.py,
                  text.py, command.py
- run.py / bench.py / bench_monitor.py / cli.py / cli_args.py / cli_output.py   the application: the `overthink` command and the
                  library calls behind it (bench_monitor.py: the monitor alone on synthetic steps)
(`overthink serve` is the application package serve/, above this one: only cli.py imports it, to register the command.)
"""

from __future__ import annotations

from typing import Any

# The public API: what wrapping a model needs, in one screen (imported lazily, see `__getattr__`).
_WHERE = {
    # models and the run
    "load_model": "monitor.models", "LoadedModel": "monitor.models",
    "RunConfig": "monitor.config", "run_problems": "monitor.run", "MonitorConfig": "monitor.config",
    # the core: one sequence's monitor, many sequences at once, what flows in and out
    "Monitor": "monitor.monitor", "MonitorBatch": "monitor.batch", "TokenStep": "monitor.events",
    "StepBatch": "monitor.events", "Decision": "monitor.decision", "DecisionContext": "monitor.decision",
    "Trace": "monitor.trace", "read_traces": "monitor.trace", "write_traces": "monitor.trace",
    # policies (a probe bundle's are `probes.policy_for`)
    "ObservePolicy": "monitor.decision", "HaltAfterPolicy": "monitor.decision", "DeerPolicy": "monitor.decision",
    "CertaindexPolicy": "monitor.decision", "parse_policy": "monitor.decision",
    # the generators (backends)
    "HFMonitoredGenerator": "monitor.backends.hf", "VLLMMonitoredGenerator": "monitor.backends.vllm",
    "AsyncVLLMMonitoredGenerator": "monitor.backends.vllm",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import monitor.cli` must not import torch before the command has installed its Ctrl-C
    # handling, and `overthink --help` should not wait for it.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
