"""`overthink collect`: labelled decision points from real rollouts (the LYNX recipe, docs/calibration.md).

Each problem is rolled out once with the monitor observing. At every decision point (cue word or step end)
the backend forces an exit on a copy of the same KV cache: the model family's exit cue is appended and the
model answers greedily within its own budget. The point is labelled 1 if that answer is correct. The
features at the point (`probes.features.point_features`), the forced answer, its confidence (the mean
probability of the answer tokens: DEER's trial confidence on the exit cue) and its token cost are kept;
so are the full trace's own answer and correctness and its token accounting.

Output directory layout (every file written atomically; a manifest is rewritten after each shard):
  manifest.json            config (model fingerprint, layers, feature names, exit cue) + shards + done ids
  shard-00000.npz          hidden (n, L*H) float32, signals (n, F) float32, label, trace_index, confidence
  shard-00000.jsonl        one line per problem: id, gold, full answer/correctness, accounting, its events
Re-running with the same --out skips problems already done (resumable), with the same settings only. A damaged
shard is reported by name (`read_shard` checks every file against the manifest); delete its two files and
resume, and its problems are done again.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.answers import check_answer, extract_answer
from monitor.config import RunConfig
from monitor.decision import CONTINUE, TRIAL, Decision, DecisionContext, TrialOutcome, TrialRequest
from monitor.io import atomic_write_bytes, atomic_write_text
from monitor.models import LoadedModel, resolve_layers
from monitor.tasks import build_prompt, grade, problem_kind, problem_task
from monitor.trace import generated_tokens
from probes.data import CollectedData
from probes.features import POINT_KINDS_FOR_PROBE, point_features, signal_feature_names

MANIFEST = "manifest.json"
FORMAT = "overthink.collect/1"


class ForcedExitLabeler:
    """A policy that never halts: at each decision point it asks the backend for a forced exit on a cache
    copy (trial prompt = the exit cue) and records the point's features and the answer's correctness."""

    name = "forced-exit-labeler"
    mean = "arithmetic"

    def __init__(self, exit_cue: str, answer_max_tokens: int, gold: str | None, kind: str,
                 layers: Sequence[int], hidden_size: int) -> None:
        self.trial_prompt = exit_cue
        self.max_trial_tokens = answer_max_tokens
        self.gold, self.kind = gold, kind
        self.layers, self.hidden_size = list(layers), hidden_size
        self.events: list[dict[str, Any]] = []
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        if ctx.point is None or ctx.point.kind not in POINT_KINDS_FOR_PROBE:
            return Decision(CONTINUE)
        self._pending = point_features(ctx, self.layers, self.hidden_size)
        return Decision(TRIAL, f"forced exit at token {ctx.point.index}",
                        trial=TrialRequest(self.trial_prompt, self.max_trial_tokens, self.mean))

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Decision:
        hidden, signals = self._pending  # type: ignore[misc]
        self._pending = None
        answer = extract_answer(self.trial_prompt + trial.text, self.kind)
        correct = None if self.gold is None else check_answer(answer, self.gold, self.kind)
        pt = ctx.point
        self.events.append({
            "hidden": hidden, "signals": signals, "label": int(bool(correct)),
            "confidence": float(trial.confidence), "probe_tokens": int(trial.n_tokens),
            "index": pt.index if pt else ctx.position, "kind": pt.kind if pt else "", "label_text": pt.label if pt else "",
            "ordinal": pt.ordinal if pt else 0, "reasoning_tokens": ctx.reasoning_tokens, "answer": answer,
            "trial": trial.record(),
        })
        return Decision(CONTINUE, score=trial.confidence)


@dataclass
class CollectResult:
    out_dir: Path
    problems_done: int
    problems_skipped: int
    events: int
    positive_rate: float | None


class CollectDataError(ValueError):
    """A collect directory that cannot be read as it is (a damaged manifest or shard): the user's to fix."""


def _redo_hint(out: Path, name: str) -> str:
    return (f"delete {name}.npz and {name}.jsonl and re-run `overthink collect` with the same --out {out} and "
            "settings to redo its problems, or re-run collect into a new directory")


def _manifest_damaged(p: Path, what: str) -> CollectDataError:
    return CollectDataError(f"{p} is damaged: {what}; re-run collect into a new directory (a manifest cannot be "
                            "rebuilt from the shards)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _load_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a collect directory (None when there is none yet), its types checked."""
    p = out / MANIFEST
    if not p.exists():
        return None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CollectDataError(f"{p} cannot be read ({e}); re-run collect into a new directory") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise _manifest_damaged(p, f"not valid JSON ({e}; a truncated or hand-edited file?)") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = f"format {m.get('format')!r}" if isinstance(m, dict) else f"a JSON {type(m).__name__}, not an object"
        raise CollectDataError(f"{p} is not an overthink collect manifest ({got}; expected format {FORMAT}); "
                               "point at a directory written by `overthink collect`, or re-run collect into a new "
                               "directory")
    cfg = m.get("config")
    if not isinstance(cfg, dict):
        raise _manifest_damaged(p, f"'config' must be an object, got {type(cfg).__name__}")
    for key in ("shards", "done"):
        v = m.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _manifest_damaged(p, f"{key!r} must be a list of strings, got {_short(v)}")
    bad = [x for x in m["shards"] if not _SHARD_NAME.fullmatch(x)]
    if bad:
        raise _manifest_damaged(p, f"shard name {bad[0]!r} is not of the form shard-NNNNN")
    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
        raise _manifest_damaged(p, f"config 'layers' must be a non-empty list of layer indices, got {_short(layers)}")
    if not _is_int(cfg.get("hidden_size")) or cfg["hidden_size"] <= 0:
        raise _manifest_damaged(p, "config 'hidden_size' must be a positive integer, got "
                                   f"{_short(cfg.get('hidden_size'))}")
    names = cfg.get("signal_features")
    if names is not None and (not isinstance(names, list) or not all(isinstance(x, str) for x in names)):
        raise _manifest_damaged(p, f"config 'signal_features' must be a list of feature names, got {_short(names)}")
    return m


def _short(v: Any) -> str:
    if v is None:
        return "nothing (missing or null)"
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


_SHARD_NAME = re.compile(r"shard-\d{5,}")
LOG_FILE = "overthink-log.jsonl"  # the collection in the `overthink.log/1` format (probes/log.py)
_SHARD_ARRAYS = ("hidden", "signals", "label", "trace_index", "confidence")
# what every problem line must hold (collect writes more): the key and the types it may have
_PROBLEM_KEYS: dict[str, tuple[type, ...]] = {"id": (str, int), "events": (list,), "full_correct": (bool, type(None)),
                                              "full_tokens": (int,)}
_EVENT_KEYS = ("label", "reasoning_tokens", "probe_tokens")


def signal_width(config: dict[str, Any]) -> int:
    """Signal + position feature columns of a collection (its own list; older manifests: this version's)."""
    return len(config.get("signal_features") or signal_feature_names())


def read_shard(out: Path, name: str, config: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """One shard's arrays and problem lines, checked against the manifest's config and each other; a damaged
    or missing file is a CollectDataError naming the file, what is wrong, and how to redo it."""
    npz, jsonl = out / f"{name}.npz", out / f"{name}.jsonl"
    hint = _redo_hint(out, name)
    for f in (npz, jsonl):
        if not f.is_file():
            raise CollectDataError(f"{f} is missing ({MANIFEST} lists shard {name}); {hint}")
    try:
        with open(npz, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CollectDataError(f"{npz} cannot be read ({e}); {hint}") from None
    if head[:2] != b"PK":  # every .npz is a zip archive; a text file, an .npy array, a pickle are not
        raise CollectDataError(f"{npz} is not an .npz archive (it starts with {head!r}, a zip file with b'PK'); "
                               f"{hint}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(npz, allow_pickle=False) as z:
            files = list(z.files)
            for k in _SHARD_ARRAYS:
                if k in files:
                    arrays[k] = z[k]
    except Exception as e:  # BadZipFile, zlib.error, EOFError, a bad array header...: not a readable shard
        raise CollectDataError(f"{npz} is not a readable collect shard, damaged or truncated ({type(e).__name__}: "
                               f"{e}); {hint}") from None
    missing = [k for k in _SHARD_ARRAYS if k not in arrays]
    if missing:
        raise CollectDataError(f"{npz} has no array {missing[0]!r} (it has {sorted(files)}; a shard needs "
                               f"{', '.join(_SHARD_ARRAYS)}); {hint}")
    for k, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise CollectDataError(f"{npz}: array {k!r} has dtype {a.dtype}, expected numbers; {hint}")
    h_dim = len(config["layers"]) * int(config["hidden_size"])
    n_sig = signal_width(config)
    hid, sig = arrays["hidden"], arrays["signals"]
    if hid.ndim != 2 or hid.shape[1] != h_dim:
        raise CollectDataError(
            f"{npz}: 'hidden' has shape {hid.shape}, but {MANIFEST} says {len(config['layers'])} layers "
            f"{config['layers']} x hidden size {config['hidden_size']} = {h_dim} columns: the shard was probably "
            f"collected with another model or layer set; {hint}")
    n = hid.shape[0]
    if sig.ndim != 2 or sig.shape != (n, n_sig):
        raise CollectDataError(f"{npz}: 'signals' has shape {sig.shape}, expected ({n}, {n_sig}) ({n} decision "
                               f"points x {n_sig} signal features); {hint}")
    for k in ("label", "trace_index", "confidence"):
        if arrays[k].shape != (n,):
            raise CollectDataError(f"{npz}: {k!r} has shape {arrays[k].shape}, expected ({n},) like 'hidden'; {hint}")
    try:
        lines = [x for x in jsonl.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CollectDataError(f"{jsonl} cannot be read ({e}); {hint}") from None
    meta: list[dict[str, Any]] = []
    for ln, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CollectDataError(f"{jsonl} line {ln} is not valid JSON ({e}; a truncated file?); {hint}") from None
        if not isinstance(rec, dict):
            raise CollectDataError(f"{jsonl} line {ln} is {type(rec).__name__}, expected a problem object; {hint}")
        for k, types in _PROBLEM_KEYS.items():
            if k not in rec or not isinstance(rec[k], types) or (types == (int,) and isinstance(rec[k], bool)):
                raise CollectDataError(f"{jsonl} line {ln}: {k!r} is {_short(rec.get(k)) if k in rec else 'missing'}"
                                       f", expected {' or '.join(t.__name__ for t in types)}; {hint}")
        for j, e in enumerate(rec["events"]):
            if not isinstance(e, dict) or not all(_is_int(e.get(k)) for k in _EVENT_KEYS):
                raise CollectDataError(f"{jsonl} line {ln}: event {j} must be an object with integer "
                                       f"{', '.join(_EVENT_KEYS)}, got {_short(e)}; {hint}")
        meta.append(rec)
    ti = arrays["trace_index"]
    if n and (not np.issubdtype(ti.dtype, np.integer) or ti.min() < 0 or ti.max() >= len(meta)):
        raise CollectDataError(f"{npz}: 'trace_index' must index the {len(meta)} problems of {jsonl.name} "
                               f"(0..{len(meta) - 1}), got values {ti.min()}..{ti.max()}; {hint}")
    counts = np.bincount(ti.astype(np.int64), minlength=len(meta)) if n else np.zeros(len(meta), np.int64)
    for i, rec in enumerate(meta):
        if counts[i] != len(rec["events"]):
            raise CollectDataError(f"{npz} holds {counts[i]} decision points of problem {rec['id']!r} but {jsonl.name} "
                                   f"lists {len(rec['events'])} events for it; {hint}")
    return arrays, meta


def _resume_shards(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Before resuming: a shard whose files the user deleted is dropped (its problems are done again), every
    other shard is checked, and "done" is rebuilt from the shards that are really there. Returns the dropped."""
    kept, done, dropped = [], [], []
    for name in manifest["shards"]:
        if not (out / f"{name}.npz").exists() or not (out / f"{name}.jsonl").exists():
            dropped.append(name)
            continue
        _, meta = read_shard(out, name, manifest["config"])
        kept.append(name)
        done.extend(str(p["id"]) for p in meta)
    manifest["shards"], manifest["done"] = kept, done
    return dropped


def _next_shard(out: Path, names: Sequence[str]) -> int:
    """The next shard number: past every listed shard and every shard file on disk (never overwrite one)."""
    taken = [int(n.split("-")[1]) for n in names]
    stems = [f.name.split(".")[0] for f in out.glob("shard-*.*")]
    taken += [int(st.split("-")[1]) for st in stems if _SHARD_NAME.fullmatch(st)]
    return max(taken, default=-1) + 1


def check_collect_out(out: str | Path, data: str | Path | None = None) -> None:
    """Cheap checks of a `collect --out` directory before the model loads: a writable directory that is not the
    --data file, and, when it holds a manifest already, one that can be read."""
    from monitor.io import check_output

    check_output(out, "--out", inputs={"--data": data} if data is not None else None, is_dir=True)
    if Path(out).is_dir():
        _load_manifest(Path(out))


def collect(lm: LoadedModel, problems: Sequence[dict[str, Any]], out_dir: str | Path, cfg: RunConfig | None = None,
            kind: str = "auto", on_batch: Callable[[int], None] | None = None) -> CollectResult:
    """Roll out `problems`, label every decision point by a forced exit, write shards to `out_dir`.

    `cfg.backend` "vllm": the rollouts run on vLLM's AsyncLLM (`cfg.batch_size` problems in flight) and each forced
    exit is a side request over the prefix cache; the hidden states come from the worker's tap, the signals see
    `cfg.vllm_logprobs` (set it to "full" for the HF collector's features)."""
    from monitor.backends.hf import HFMonitoredGenerator

    cfg = cfg or RunConfig()
    cfg.validate()
    out = Path(out_dir)
    check_collect_out(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = resolve_layers(lm, cfg.layers)
    hidden_size = int(lm.model.config.hidden_size)
    if kind != "auto" and cfg.answer_kind == "auto":
        cfg.answer_kind = kind
    task = problem_task(lm, cfg)  # one exit cue and answer budget for the whole collection
    config = {"model": lm.name, "model_fingerprint": lm.fingerprint, "layers": layers, "hidden_size": hidden_size,
              "exit_cue": task.exit_cue, "answer_max_tokens": task.answer_max_tokens, "answer_kind": task.kind,
              "max_new_tokens": cfg.max_new_tokens, "signal_features": signal_feature_names(),
              "block_tokens": cfg.block_tokens, "min_step_tokens": cfg.min_step_tokens,
              "cue_words": list(cfg.cue_words), "embedder": cfg.embedder, "backend": cfg.backend,
              "logprobs": cfg.vllm_logprobs if cfg.backend == "vllm" else "full"}
    manifest = _load_manifest(out)
    if manifest is None:
        manifest = {"format": FORMAT, "config": config, "shards": [], "done": []}
    elif manifest["config"].get("model_fingerprint") != lm.fingerprint or manifest["config"].get("layers") != layers:
        raise ValueError(f"{out} holds data collected from another model or layer set "
                         f"({manifest['config'].get('model')}, layers {manifest['config'].get('layers')}); "
                         "use a new --out directory")
    else:
        _check_resume(out, manifest["config"], config)
        if _resume_shards(out, manifest):  # the user deleted a damaged shard: its problems are done again
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    done = set(manifest["done"])
    next_shard = _next_shard(out, manifest["shards"])
    todo = [p for p in problems if str(p["id"]) not in done]
    skipped = len(problems) - len(todo)
    labelers: list[ForcedExitLabeler] = []
    golds: Any = iter([])
    kinds: Any = iter([])

    def new_labeler() -> ForcedExitLabeler:  # one per sequence, in batch order
        lab = ForcedExitLabeler(task.exit_cue, task.answer_max_tokens, next(golds), next(kinds), layers, hidden_size)
        labelers.append(lab)
        return lab

    factory = cfg.monitor_factory(layers, lm.family.think_end, new_labeler)
    runner = None
    if cfg.backend == "vllm":
        from monitor.backends.vllm import BlockingAsyncGenerator
        from monitor.backends.vllm_engine import build_vllm_engine

        if not cfg.vllm_hidden:
            raise ValueError("collect needs the hidden states at each decision point: drop --no-hidden")
        runner = build_vllm_engine(lm, cfg, runner=True)
        gen: Any = BlockingAsyncGenerator(runner, lm.tokenizer, factory, layers=layers, exit_cue=task.exit_cue,
                                          answer_max_tokens=task.answer_max_tokens, hidden=True,
                                          force=cfg.vllm_force, logprobs=cfg.vllm_logprobs)
    else:
        gen = HFMonitoredGenerator(lm.model, lm.tokenizer, factory, layers=layers, exit_cue=task.exit_cue,
                                   answer_max_tokens=task.answer_max_tokens)
    n_events = n_pos = 0
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            labelers.clear()
            golds = iter([None if p.get("answer") is None else str(p["answer"]) for p in batch])
            kinds = iter([problem_kind(task.kind, p) for p in batch])
            prompts = [build_prompt(lm, cfg, p) for p in batch]
            results = gen.generate(prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            shard = _write_shard(out, next_shard, batch, results, labelers)
            next_shard += 1
            manifest["shards"].append(shard["name"])
            manifest["done"].extend(str(p["id"]) for p in batch)
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
            n_events += shard["events"]
            n_pos += shard["positives"]
            if on_batch:
                on_batch(len(batch))
    finally:
        gen.close()
        if runner is not None:
            runner.shutdown()
    if manifest["shards"]:  # the collection as an `overthink.log/1` file too (rewritten whole, atomically)
        from probes.log import write_log

        write_log(load_collected(out), out / LOG_FILE)
    return CollectResult(out, len(todo), skipped, n_events, (n_pos / n_events) if n_events else None)


_RESUME_KEYS = ("exit_cue", "answer_max_tokens", "max_new_tokens", "block_tokens", "min_step_tokens", "cue_words",
                "embedder", "answer_kind", "backend", "logprobs")


def _check_resume(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Resuming must not mix settings: every setting that shapes a label or a feature has to match."""
    diff = [f"{k} {old[k]!r} -> {new[k]!r}" for k in _RESUME_KEYS if k in old and old[k] != new[k]]
    if diff:
        raise ValueError(f"{out} was collected with other settings ({'; '.join(diff)}); resume with the same "
                         "settings or use a new --out directory")


def _write_shard(out: Path, k: int, batch: Sequence[dict[str, Any]], results: Sequence[Any],
                 labelers: Sequence[ForcedExitLabeler]) -> dict[str, Any]:
    name = f"shard-{k:05d}"
    hidden, signals, label, trace_idx, conf = [], [], [], [], []
    lines = []
    for i, (p, r, lab) in enumerate(zip(batch, results, labelers)):
        gold = None if p.get("answer") is None else str(p["answer"])
        full_answer, full_correct = grade(r, gold, lab.kind)
        events = []
        for e in lab.events:
            hidden.append(e["hidden"])
            signals.append(e["signals"])
            label.append(e["label"])
            trace_idx.append(i)
            conf.append(e["confidence"])
            events.append({k2: e[k2] for k2 in ("index", "kind", "label_text", "ordinal", "reasoning_tokens",
                                                "answer", "label", "confidence", "probe_tokens", "trial")})
        acc = r.monitor.accounting(r.prompt_tokens)
        lines.append(json.dumps({"id": str(p["id"]), "gold": gold, "full_answer": full_answer,
                                 "full_correct": full_correct, "accounting": acc,
                                 "full_tokens": generated_tokens(acc, probe=False),
                                 "stop_reason": r.stop_reason, "events": events}, ensure_ascii=False))
    n_sig = len(signal_feature_names())
    h_dim = len(labelers[0].layers) * labelers[0].hidden_size if labelers else 0
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        hidden=np.asarray(hidden, dtype=np.float32).reshape(-1, h_dim),
        signals=np.asarray(signals, dtype=np.float32).reshape(-1, n_sig),
        label=np.asarray(label, dtype=np.int8), trace_index=np.asarray(trace_idx, dtype=np.int32),
        confidence=np.asarray(conf, dtype=np.float32),
    )
    # data first, then its metadata, then (by the caller) the manifest that makes the shard count
    atomic_write_bytes(out / f"{name}.npz", buf.getvalue())
    atomic_write_text(out / f"{name}.jsonl", "\n".join(lines) + "\n")
    return {"name": name, "events": len(label), "positives": int(sum(label))}


def load_collected(path: str | Path) -> CollectedData:
    """Every shard of a collect directory, checked (see `read_shard`): a damaged, missing or mis-shaped file is a
    CollectDataError (a ValueError) naming the file, what is wrong with it and how to redo it."""
    out = Path(path)
    if not out.is_dir():
        raise CollectDataError(f"{out} is not a collect directory; create one with `overthink collect --out {out}`")
    m = _load_manifest(out)
    if m is None:
        raise CollectDataError(f"{out} has no {MANIFEST}; create it with `overthink collect --out {out}`")
    cfg = m["config"]
    hs, ss, ls, cs, gs, problems = [], [], [], [], [], []
    for name in m["shards"]:
        arrays, meta = read_shard(out, name, cfg)
        base = len(problems)
        hs.append(arrays["hidden"].astype(np.float32, copy=False))
        ss.append(arrays["signals"].astype(np.float32, copy=False))
        ls.append(arrays["label"])
        cs.append(arrays["confidence"])
        gs.append(arrays["trace_index"].astype(np.int64) + base)
        problems.extend(meta)
    if not problems:
        raise CollectDataError(f"{out} holds no collected problems yet; run `overthink collect --out {out}`")
    return CollectedData(cfg, np.vstack(hs), np.vstack(ss), np.concatenate(ls), np.concatenate(cs),
                         np.concatenate(gs), problems)
