"""Host instructions per token of the batched monitor, counted by valgrind (callgrind): a nearly fixed figure.

Wall time and CPU time on this project's VM move by +-20% between runs of the same code, so a change of a few
percent to the hot path cannot be seen in `overthink bench monitor`. The number of instructions the CPU executes
for the same synthetic steps moves by under about 1% between runs. This runs `monitor.bench_monitor`'s synthetic steps (the default
four families on 4 tapped layers x 896, top-20 log-probabilities, the default recording level) through one
`MonitorBatch` per batch size under callgrind, counting only the steps themselves: `os.getppid()` before a run of
steps zeroes the counters and `os.getuid()` after it dumps them. Each batch size is fed N1 and then N2 steps, and
(count(N2) - count(N1)) / ((N2 - N1) x B) is the figure, so whatever a run costs once cancels out.

    python scripts/host_instructions.py                      # this working tree
    python scripts/host_instructions.py --ref HEAD~1         # also a git ref (checked out to a temporary worktree)
    python scripts/host_instructions.py --signals none       # the batch's own work alone (no signal family)

Prints one JSON object: per tree and batch size, instructions per token and per step. Each tree costs one
process under valgrind (~3 min here, mostly importing torch). Instructions are not time (a cache miss costs
more than an add), but the same instructions take the same time: use this for A/B of host-side changes, and
`overthink bench monitor` for what a token costs. Needs valgrind (Debian: `apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the measured program, run under valgrind with the tree to measure first on sys.path
_CHILD = r"""
import os, sys
import numpy as np, torch
torch.set_num_threads(1)
from monitor import bench_monitor as bm
from monitor.cues import CueDetector
from monitor.monitor import Monitor
from monitor.batch import MonitorBatch
from monitor.vocab import TokenTable
batches, n1, n2, signals = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
layers = [0, 1, 2, 3]
dists = bm._distributions(20, 151_936, 8, np.random.default_rng(0))
gen = torch.Generator().manual_seed(1)
hidden = [{layer: torch.randn(896, generator=gen) for layer in layers} for _ in range(8)]
for b in batches:
    pool = bm._batches(b, dists, hidden)
    for n in (n1, n2):
        mb = bm._monitors(b, layers, "default") if signals == "all" else MonitorBatch.create(
            lambda: Monitor(signals=[], cues=CueDetector(think_end="</think>")), b, table=TokenTable(bm.VOCAB))
        bm._feed(mb, 8, pool)  # warm: the state tensors and caches exist
        os.getppid()  # callgrind zeroes its counters here
        bm._feed(mb, n, pool)
        os.getuid()  # and dumps them here
"""


def _count(tree: Path, batches: list[int], n1: int, n2: int, signals: str) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        child = Path(tmp) / "child.py"
        child.write_text(_CHILD)
        out = Path(tmp) / "cg.out"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        cmd = ["valgrind", "--tool=callgrind", "--cache-sim=no", "--zero-before=getppid", "--dump-before=getuid",
               f"--callgrind-out-file={out}", sys.executable, str(child), ",".join(map(str, batches)), str(n1),
               str(n2), signals]
        run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"valgrind failed on {tree} (rc {run.returncode}):\n{run.stderr[-3000:]}")
        dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.suffix[1:]))
        totals = []
        for d in dumps:
            for line in d.read_text().splitlines():
                if line.startswith("summary:"):
                    totals.append(int(line.split()[1]))
                    break
        # one dump per getuid() call; anything else calling getuid() before the steps would add dumps in front
        totals = totals[-2 * len(batches):]
        if len(totals) != 2 * len(batches):
            raise SystemExit(f"expected {2 * len(batches)} callgrind dumps, found {len(totals)} in {tmp}")
    res = {}
    for i, b in enumerate(batches):
        c1, c2 = totals[2 * i], totals[2 * i + 1]
        per_step = (c2 - c1) / (n2 - n1)
        res[str(b)] = {"instructions_per_token": round(per_step / b), "instructions_per_step": round(per_step)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="also count a git ref (e.g. HEAD~1), checked out to a temporary worktree")
    ap.add_argument("--batch", default="64,256", help="batch sizes (default 64,256)")
    ap.add_argument("--steps", default="40,80", help="N1,N2: the two run lengths whose difference is counted")
    ap.add_argument("--signals", choices=("all", "none"), default="all",
                    help="the default four families (all), or none: the batch's own work alone")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: `apt-get install valgrind` (Debian), then run this again")
    try:
        batches = [int(x) for x in args.batch.split(",")]
        n1, n2 = (int(x) for x in args.steps.split(","))
    except ValueError:
        raise SystemExit(f"--batch takes sizes like 64,256 and --steps two lengths like 40,80; got {args.batch!r} "
                         f"and {args.steps!r}") from None
    if not 0 < n1 < n2 or min(batches) < 1:
        raise SystemExit("--steps needs 0 < N1 < N2, and --batch positive sizes")
    result: dict[str, object] = {"setup": {"batches": batches, "steps": [n1, n2], "signals": args.signals,
                                           "logprobs": 20, "hidden": "4 x 896", "record": "default"}}
    result["working tree"] = _count(ROOT, batches, n1, n2, args.signals)
    if args.ref:
        with tempfile.TemporaryDirectory(prefix="ref-") as tmp:
            wt = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), args.ref], check=True,
                           capture_output=True)
            try:
                result[args.ref] = _count(wt, batches, n1, n2, args.signals)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                               capture_output=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
