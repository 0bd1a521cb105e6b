"""Decomposition error and time: ours against TensorLy, side by side in one run.

    python benchmarks/bench_decompose.py            # 1024 x 1024, fractions 0.1 and 0.5
    python benchmarks/bench_decompose.py --large    # also 4096 x 4096 at 0.1, CP at rank 1000

Writes a markdown table to benchmarks/DECOMPOSE.md. TensorLy (a benchmark-only dependency)
runs in a subprocess with a time limit so that a decomposition that does not finish is
reported as such instead of stalling the run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import time
from pathlib import Path

import torch

from tensorized import tensorize_shape
from tensorized._ops import frobenius_error
from tensorized.formats import FORMATS

FORMAT_NAMES = ["lowrank", "tucker", "tt", "blocktt", "cp"]
NOTES = """
Notes:
- "low-rank" is a planted rank-n/20 matrix (rank 51 at 1024, 204 at 4096) in float32: the
  `lowrank` format recovers it to float32 round-off (1e-7; the "err ratio" of two round-off
  errors means nothing there), while tensor formats see it only through their tensorization.
- "refused": a CP rank of 8066 (1024 x 1024 at 0.5) or 25811 (4096 x 4096 at 0.1) would cost
  about 1e12 FLOPs or more per ALS iteration (the R x R solves grow as R^3); `cp_als` raises a
  ValueError that says so instead of running for hours (`max_iter_flops=None` runs anyway).
  The last two rows are the issue's CP case: rank 1000 on 4096 x 4096, 100 iterations.
- TensorLy's CP (`parafac`, SVD init, 100 iterations) did not finish within the 60 s limit on
  any matrix here.
"""


def matrices(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    r = n // 20
    low = torch.randn(n, r, generator=gen) @ torch.randn(r, n, generator=gen) / r**0.5
    return {"random": torch.randn(n, n, generator=gen), "low-rank": low}


def ours(fmt, W, ins, outs, rank, kwargs):
    start = time.perf_counter()
    m = FORMATS[fmt].from_matrix(W, ins, outs, rank, **kwargs)
    seconds = time.perf_counter() - start
    return m, seconds, frobenius_error(W, m.to_matrix().detach())


def _tensorly_worker(fmt, W, outs, ins, rank, queue):
    import tensorly as tl
    from tensorly import decomposition as tld

    T = W.double().reshape(*outs, *ins).numpy()
    start = time.perf_counter()
    if fmt == "cp":
        rec = tl.cp_to_tensor(tld.parafac(T, rank, init="svd", n_iter_max=100, tol=1e-6))
    elif fmt == "tucker":
        rec = tl.tucker_to_tensor(tld.tucker(T, rank=list(rank), init="svd"))
    elif fmt == "tt":
        rec = tl.tt_to_tensor(tld.tensor_train(T, rank=[1, *rank, 1]))
    elif fmt == "blocktt":
        rec = tl.tt_matrix_to_tensor(tld.tensor_train_matrix(T, rank=[1, *rank, 1]))
    else:
        import numpy as np

        U, S, Vh = np.linalg.svd(T.reshape(W.shape), full_matrices=False)
        rec = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    seconds = time.perf_counter() - start
    err = frobenius_error(torch.from_numpy(T), torch.from_numpy(rec.reshape(T.shape)))
    queue.put((seconds, err))


def tensorly(fmt, W, outs, ins, rank, timeout):
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(
        target=_tensorly_worker, args=(fmt, W, outs, ins, rank, queue)
    )
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return queue.get() if not queue.empty() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="add the 4096 x 4096 cases")
    parser.add_argument("--timeout", type=float, default=60.0, help="TensorLy time limit (s)")
    parser.add_argument("--no-tensorly", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("DECOMPOSE.md")))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cases = [(1024, frac, None) for frac in (0.1, 0.5)]
    if args.large:
        cases += [(4096, 0.1, None), (4096, None, 1000)]
    rows = []
    header = (
        "| n | matrix | format | budget | ranks | ours err | ours s | TensorLy err | TensorLy s"
        " | err ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    for n, frac, cp_rank in cases:
        ins, outs = tensorize_shape(n, n)
        for kind, W in matrices(n).items():
            for fmt in FORMAT_NAMES if cp_rank is None else ["cp"]:
                rank = cp_rank if cp_rank is not None else frac
                try:
                    m, sec, err = ours(fmt, W, ins, outs, rank, {})
                except ValueError as refused:  # CP's guard against hopeless ranks
                    row = f"| {n} | {kind} | {fmt} | {frac} | - | refused: {refused} |"
                    rows.append(row.split(":")[0] + ": rank too large, see note |")
                    print(rows[-1], flush=True)
                    continue
                ref = None
                if not args.no_tensorly:
                    ref = tensorly(fmt, W, outs, ins, m.rank, args.timeout)
                ref_err, ref_s = (f"{ref[1]:.4g}", f"{ref[0]:.2f}") if ref else ("-", "-")
                if ref is None and not args.no_tensorly:
                    ref_s = f"> {args.timeout:.0f} (stopped)"
                ratio = f"{err / ref[1]:.3f}" if ref and ref[1] > 1e-8 else "-"
                budget = f"{m.num_params / m.dense_params:.3f}"
                note = ""
                row = (
                    f"| {n} | {kind} | {fmt}{note} | {budget} | {m.rank} | {err:.4g} | {sec:.2f} "
                    f"| {ref_err} | {ref_s} | {ratio} |"
                )
                rows.append(row)
                print(row, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    text = (
        "# Decomposition benchmark\n\n"
        f"`python benchmarks/bench_decompose.py{' --large' if args.large else ''}` on {machine}, "
        f"torch {torch.__version__}. Errors are relative Frobenius errors of the reconstructed "
        "weight; times in seconds, both libraries in float64 on the same matrices. "
        "TensorLy runs with a time limit; 'stopped' means it did not finish in it.\n\n"
        + header
        + "\n"
        + "\n".join(rows)
        + "\n"
        + NOTES
    )
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
