"""A seeded capture of every signal value and decision of the batched monitor, to check that a change of the hot
path leaves every value unchanged to the last bit.

    python scripts/signal_capture.py capture /tmp/before.npz        # on the old code (e.g. a git worktree)
    python scripts/signal_capture.py capture /tmp/after.npz         # on the new code
    python scripts/signal_capture.py compare /tmp/before.npz /tmp/after.npz

The capture feeds one `MonitorBatch` (the default signal set on 4 tapped layers, as `overthink run` builds it)
300 synthetic steps of `monitor.bench_monitor`: 16 rows for 100 steps, then 9 of them (rows leaving), then 9 new
slots (rows joining), once with top-20, once with top-5 log-probabilities and once with full distributions. It
records each family's output at every step, every row's decision, and at the end each sequence's trace
(its tokens, texts, series and decision points, as JSON). `compare` exits 1 and names the first
differences if any array differs (NaN equal to NaN) or any decision differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def capture(path: Path) -> None:
    import torch

    from monitor import bench_monitor as bm

    torch.set_num_threads(1)
    arrays: dict[str, np.ndarray] = {}
    for lp in (20, 5, "full"):
        rng = np.random.default_rng(0)
        dists = bm._distributions(lp, 5000 if lp == "full" else 151_936, 32, rng)
        layers = [0, 1, 2, 3]
        gen = torch.Generator().manual_seed(1)
        hidden = [{layer: torch.randn(64, generator=gen) for layer in layers} for _ in range(8)]
        p16, p9 = bm._batches(16, dists, hidden), bm._batches(9, dists, hidden)
        mb = bm._monitors(25, layers, "default")
        step = [0]
        for sig in mb.shared:
            run = sig.update_batch

            def update_batch(batch: object, run: object = run, name: str = sig.name, lp: object = lp,
                             step: list[int] = step) -> object:
                out = run(batch)  # type: ignore[operator]
                for k, v in out.items():
                    arrays[f"{lp}/{step[0]:03d}/{name}.{k}"] = v.detach().cpu().double().numpy().copy()
                return out
            sig.update_batch = update_batch
        decisions = []
        for i in range(300):
            step[0] = i
            if i < 100:
                proto, slots = p16[i % 8], np.arange(16)
            elif i < 200:
                proto, slots = p9[i % 8], np.array([0, 2, 3, 5, 7, 8, 11, 13, 15])
            else:
                proto, slots = p9[i % 8], np.arange(16, 25)
            tok = bm._token(i)
            batch = dataclasses.replace(proto, slots=slots, token_ids=np.full(proto.size, tok),
                                        texts=[bm.VOCAB[tok]] * proto.size)
            decisions.append([repr(d) for d in mb.observe(batch)])
        arrays[f"{lp}/decisions"] = np.array(["|".join(d) for d in decisions])
        for j, m in enumerate(mb.monitors):  # what each trace records (tokens, texts, series, points)
            m.finish()
            tr = m.to_trace(trace_id=str(j), model="synthetic", backend="capture", question="")
            arrays[f"{lp}/trace/{j:02d}"] = np.array(json.dumps(tr.to_dict(), sort_keys=True, default=str))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}: {len(arrays)} arrays")


def compare(a: Path, b: Path) -> int:
    x, y = np.load(a), np.load(b)
    bad = sorted(set(x.files) ^ set(y.files))
    for k in sorted(set(x.files) & set(y.files)):
        u, v = x[k], y[k]
        same = np.array_equal(u, v) if u.dtype.kind in "US" else (u.shape == v.shape
                                                                   and np.array_equal(u, v, equal_nan=True))
        if not same:
            bad.append(k)
    for k in bad[:10]:
        print(f"differs: {k}")
    print(f"{len(x.files)} arrays: " + ("identical" if not bad else f"{len(bad)} differ"))
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("out", type=Path)
    m = sub.add_parser("compare")
    m.add_argument("a", type=Path)
    m.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "capture":
        capture(args.out)
    else:
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
