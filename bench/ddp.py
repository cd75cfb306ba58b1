"""Cost of the gathered LSM loss under DDP: all_gather + soft MD-LSM of the global batch
against the soft MD-LSM of the local batch, in W gloo processes on the CPU.

    python bench/ddp.py                    # W=2, n per rank 64/256, widths 32/256
    python bench/ddp.py --world 2 --n 32 128 --d 64 --reps 20

Per configuration, forward + backward of ``soft_md_lsm`` (the LSM loss's score, crossfit
as in the app) on rank 0, median over ``--reps`` after a warm-up, ranks synchronised by a
barrier before each repetition:

* local: the rank's own batch (``lsm.loss.gather=false``);
* gather: ``all_gather_cat`` of the features and labels alone (the communication);
* gathered: all_gather + score of the W·n samples (``lsm.loss.gather=true``);
* ratio gathered / local.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsm_train.distributed import all_gather_cat  # noqa: E402
from lsm_train.measures.soft import soft_md_lsm  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    try:
        for n in args.n:
            for d in args.d:
                g = torch.Generator().manual_seed(rank * 1000 + n + d)
                y = torch.arange(n) % args.classes
                H = (torch.randn(n, d, generator=g) + 0.5 * y[:, None]).requires_grad_(True)

                def local(H=H, y=y):
                    soft_md_lsm(H, y, 0.5, crossfit=True).backward()
                    H.grad = None

                def gather_only(H=H, y=y):
                    all_gather_cat(H.detach(), interleave=True)
                    all_gather_cat(y, interleave=True)

                def gathered(H=H, y=y):
                    Hg = all_gather_cat(H, interleave=True)  # as LSMLoss(gather=True)
                    s = soft_md_lsm(Hg, all_gather_cat(y, interleave=True), 0.5, crossfit=True)
                    s.backward()
                    H.grad = None

                rows.append((n, d, _median_ms(local, args.reps),
                             _median_ms(gather_only, args.reps),
                             _median_ms(gathered, args.reps)))
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[64, 256], help="samples per rank")
    ap.add_argument("--d", type=int, nargs="+", default=[32, 256], help="feature width")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, out),
                 nprocs=args.world, join=True)
        rows = torch.load(out)
    print(f"W={args.world} gloo processes, 1 thread each, {args.classes} classes, "
          f"soft MD-LSM forward+backward (crossfit), median of {args.reps}, rank 0")
    print(f"{'n/rank':>7} {'d':>5} {'local ms':>9} {'gather ms':>10} {'gathered ms':>12} "
          f"{'ratio':>6}")
    for n, d, t_local, t_gather, t_total in rows:
        print(f"{n:>7} {d:>5} {t_local:>9.2f} {t_gather:>10.2f} {t_total:>12.2f} "
              f"{t_total / t_local:>6.2f}")


if __name__ == "__main__":
    main()
