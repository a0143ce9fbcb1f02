"""Time `supcon_loss` (one [nm, nm] matrix) against a naive per-anchor loop, forward + backward, side by side.

    python benchmarks/loss_bench.py [--repeats 5] [--threads 1]

Reference batch: B=32 patients, S=2 slides, P=2 patches, V=2 views, D=128; every HVC level is timed.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from hlss_hf.models.hlss.losses import LEVELS, hierarchical_contrastive_loss, supcon_loss


def naive_supcon(features, temperature=0.07, base_temperature=0.07):
    """One anchor at a time: the loop a first implementation would write."""
    n, m, d = features.shape
    flat = features.reshape(n * m, d).float()
    losses = []
    for i in range(n * m):
        others = torch.cat([flat[:i], flat[i + 1 :]])  # [nm - 1, D]
        log_denominator = torch.logsumexp(others @ flat[i] / temperature, dim=0)
        k = i // m
        positives = [flat[j] for j in range(k * m, (k + 1) * m) if j != i]
        log_probs = torch.stack([flat[i] @ f / temperature - log_denominator for f in positives])
        losses.append(-(temperature / base_temperature) * log_probs.mean())
    return torch.stack(losses).mean()


def grouped(features, level):
    b, s, p, v, d = features.shape
    shapes = {"patch": (b * s * p, v, d), "slide": (b * s, p * v, d), "patient": (b, s * p * v, d)}
    return features.reshape(shapes[level])


def timed(fn, features, repeats):
    best = float("inf")
    for _ in range(repeats):
        leaf = features.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = fn(leaf)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return best, loss.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = F.normalize(torch.randn(32, 2, 2, 2, 128), dim=-1)  # [B, S, P, V, D]
    print(f"B=32 S=2 P=2 V=2 D=128, forward+backward, best of {args.repeats}, {args.threads} thread(s)")
    print(f"{'level':8s} {'supcon_loss ms':>15s} {'naive loop ms':>14s} {'ratio':>7s}")
    for level in LEVELS:
        fast, fast_loss = timed(
            lambda x, lv=level: hierarchical_contrastive_loss(x, lv), features, args.repeats
        )
        slow, slow_loss = timed(lambda x, lv=level: naive_supcon(grouped(x, lv)), features, args.repeats)
        assert torch.allclose(fast_loss, slow_loss, atol=1e-4), (level, fast_loss, slow_loss)
        print(f"{level:8s} {fast * 1e3:15.2f} {slow * 1e3:14.1f} {slow / fast:6.0f}x")
    # The plain function, for reference (patch level shape).
    fast, _ = timed(lambda x: supcon_loss(grouped(x, "patch")), features, args.repeats)
    print(f"supcon_loss [128, 2, 128] alone: {fast * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
