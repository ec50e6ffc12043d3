"""What capturing the monitor's step in a CUDA graph would save on the host: one family's kernel chain, eager
against replayed, on a GPU (the measurement issue 11's next design step needs; see the README's "Measured").

`jsd_sparse` (JSD instability's top-k path: 43 kernels, counted as `bench monitor` counts them; no host sync
inside) is run on fixed-shape inputs of B rows x k ids, first eagerly and then as a captured
`torch.cuda.CUDAGraph` replayed on the same buffers. Per batch size it reports the host time per call (the wall time of enqueueing N calls / N, the GPU
being faster than the host here; then one synchronize, not counted), the kernels per call, and whether the
replayed result equals the eager one bit for bit.

    python scripts/graph_probe.py --device cuda --json       # on a GPU (scripts/gpu_figures.sh runs it)
    python scripts/graph_probe.py --device cpu               # eager only (no graphs on a CPU)

Needs only torch and numpy. A benchmark: it reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _inputs(b: int, k: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = 4 * k  # small enough that the two supports overlap a lot, as consecutive tokens' do
    ids_a = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(b)])
    ids_b = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(b)])
    pa = torch.softmax(torch.randn(b, k, generator=g) * 2, -1)
    pb = torch.softmax(torch.randn(b, k, generator=g) * 2, -1)
    return [t.to(device) for t in (ids_a, pa.float(), ids_b, pb.float())]


def _kernels(fn, args) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    from monitor.bench_monitor import computes  # the rule `bench monitor`'s kernel_ops_per_step counts by

    n = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            n[0] += computes(func)
            return func(*a, **(kw or {}))

    with Count():
        fn(*args)
    return n[0]


def probe(batches: list[int], k: int, device: str, calls: int) -> list[dict]:
    import torch

    from monitor.signals.jsd_instability import jsd_sparse

    rows = []
    for b in batches:
        args = _inputs(b, k, device, seed=b)

        def fn(ia, pa, ib, pb):  # noqa: ANN001, ANN202
            return jsd_sparse(ia, pa, ib, pb, 1e-6)

        ref = fn(*args)
        for _ in range(10):
            fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            best = min(best, (time.perf_counter() - t0) / calls)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        row = {"batch": b, "k": k, "device": device, "kernels_per_call": _kernels(fn, args),
               "eager_host_us_per_call": round(best * 1e6, 2)}
        if device.startswith("cuda"):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
                for _ in range(3):
                    fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*args)
            graph.replay()
            torch.cuda.synchronize()
            row["graph_equals_eager"] = bool(torch.equal(out, ref))
            gbest = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    graph.replay()
                gbest = min(gbest, (time.perf_counter() - t0) / calls)
                torch.cuda.synchronize()
            row["graph_host_us_per_call"] = round(gbest * 1e6, 2)
            row["host_saved_us_per_call"] = round((best - gbest) * 1e6, 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda; graphs only on CUDA)")
    ap.add_argument("--batch", default="16,64,256", help="batch sizes (default 16,64,256)")
    ap.add_argument("--k", type=int, default=20, help="top-k ids per row (default 20)")
    ap.add_argument("--calls", type=int, default=200, help="calls per timing (default 200; best of 5)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine, or pass --device cpu for the eager figure")
    try:
        batches = [int(x) for x in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"--batch takes sizes like 16,64,256; got {args.batch!r}") from None
    if min(batches) < 1 or args.k < 1 or args.calls < 1:
        raise SystemExit("--batch sizes, --k and --calls must be positive")
    torch.set_num_threads(1)
    rows = probe(batches, args.k, args.device, args.calls)
    if args.json:
        print(json.dumps({"jsd_sparse": rows}, indent=2))
    else:
        for r in rows:
            print("  ".join(f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
