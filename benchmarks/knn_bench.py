"""kNN benchmark: time and peak extra memory of chunked `knn_predict` vs one full similarity matrix.

    python benchmarks/knn_bench.py                       # banks 10k, 100k, 300k x 256; 10k queries; CPU
    python benchmarks/knn_bench.py --banks 10000 50000 --queries 2000 --threads 2

Each (method, bank size) runs in a fresh process: the bank and queries are built in place, the process's RSS is
read, the method runs, and the extra memory is the process's peak RSS (`ru_maxrss`) minus that RSS. "full" is
the obvious implementation (`(query @ bank.T).topk(k)`, one `[Q, M]` matrix); it is skipped when that matrix
would exceed `--max-full-gb`. The last row (unless `--no-million`) is a 1M x 256 bank with `--million-queries`
queries, chunked only, to show the memory bound at that size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _full_knn(query, bank, bank_labels, num_classes, k, temperature):
    import torch

    sim = query @ bank.T  # [Q, M]: the whole similarity matrix at once
    top_sim, top_idx = sim.topk(k, dim=1)
    scores = torch.zeros(query.shape[0], num_classes)
    return scores.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())


def _worker(method, bank_size, num_queries, dim, k, threads, result_queue):
    import torch
    import torch.nn.functional as F

    from hlss_hf.evaluation import knn_predict

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    bank = torch.empty(bank_size, dim)
    for start in range(0, bank_size, 65536):  # in place: no full-size temporaries before the measurement
        stop = min(start + 65536, bank_size)
        bank[start:stop] = F.normalize(torch.randn(stop - start, dim, generator=generator), dim=-1)
    query = F.normalize(torch.randn(num_queries, dim, generator=generator), dim=-1)
    labels = torch.randint(0, 7, (bank_size,), generator=generator)
    before = _rss_bytes()
    start = time.perf_counter()
    if method == "chunked":
        scores = knn_predict(query, bank, labels, 7, k=k, temperature=0.07)
    else:
        scores = _full_knn(query, bank, labels, 7, k, 0.07)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    result_queue.put({"seconds": seconds, "extra": max(peak - before, 0), "checksum": float(scores.sum())})


def measure(method, bank_size, num_queries, dim=256, k=200, threads=2):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(method, bank_size, num_queries, dim, k, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-full-gb", type=float, default=4.5, help="skip 'full' above this matrix size")
    parser.add_argument("--no-million", action="store_true", help="skip the 1M-bank chunked row")
    parser.add_argument("--million-queries", type=int, default=2_000)
    args = parser.parse_args(argv)

    mib = 2**20
    rows = [(m, args.queries) for m in args.banks]
    if not args.no_million:
        rows.append((1_000_000, args.million_queries))
    header = (
        f"{'bank':>9} {'queries':>8} {'bank MiB':>9} | {'chunked s':>9} {'extra MiB':>9} | "
        f"{'full s':>7} {'extra MiB':>9} | {'time full/chunked':>17} {'mem full/chunked':>16} {'chunked extra/bank':>18}"
    )
    print(header)
    print("-" * len(header))
    for bank_size, num_queries in rows:
        bank_mib = bank_size * args.dim * 4 / mib
        chunked = measure("chunked", bank_size, num_queries, args.dim, args.k, args.threads)
        full_gb = num_queries * bank_size * 4 / 2**30
        is_million = bank_size == 1_000_000 and not args.no_million and bank_size not in args.banks
        if full_gb <= args.max_full_gb and not is_million:
            full = measure("full", bank_size, num_queries, args.dim, args.k, args.threads)
            if abs(full["checksum"] - chunked["checksum"]) > 1e-3 * abs(full["checksum"]):
                raise RuntimeError(
                    f"results differ at bank {bank_size}: {full['checksum']} vs {chunked['checksum']}"
                )
            full_cols = f"{full['seconds']:7.2f} {full['extra'] / mib:9.0f}"
            ratios = f"{full['seconds'] / chunked['seconds']:17.2f} {full['extra'] / max(chunked['extra'], 1):16.1f}"
        else:
            full_cols = f"{'skip':>7} {f'~{full_gb * 1024:.0f}':>9}"
            ratios = f"{'-':>17} {'-':>16}"
        print(
            f"{bank_size:9d} {num_queries:8d} {bank_mib:9.0f} | {chunked['seconds']:9.2f} {chunked['extra'] / mib:9.0f}"
            f" | {full_cols} | {ratios} {chunked['extra'] / mib / bank_mib:18.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
