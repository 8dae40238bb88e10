"""Which product a convolution takes against class directions: the ghost product or its own.

For ResNet-18's 3x3 convolutions on 32x32 images (second stage: 4x4 output positions, third: 2x2, fourth:
1x1), a batch of 64 training samples and 10 class directions, times ``hydraclean.ghost.ghost_products``
(against 100, 500 and 2000 validation rows; by input positions where ``ConvAlgebra.by_positions`` takes
them at that input size, *form* "positions", else by the unfolded input) and the layer's own
``ConvAlgebra.apply`` with the directions as ``ConvAlgebra.prepare`` forms them once per projection (the
unfolded inputs without the rows that read only padding, or the dense map at inputs smaller than the
kernel's reach), beside the same products by one convolution of the inputs with the directions
(``ConvAlgebra._convolved_products``), and says which one ``hydraclean.ghost.pays`` picks, with the
convolution's ``ghost_penalty`` and without it (1.0). One torch thread, median of 5 calls after one warm-up,
seeded inputs.

``--fits N``: then the default fit of benchmarks/architectures.py's BatchNorm ResNet-18 row on its first
1,000 images, with the penalty and without it, alternating, N rounds in one process (the scores agree to
float32 rounding; only the time differs).

    python benchmarks/ghost_choice.py [--fits 2] [--smoke] [--out docs/_generated/ghost_choice.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from measure import median_ms  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from hydraclean.ghost import ghost_products, pays
from hydraclean.layers import ConvAlgebra, GhostFactors

BATCH, K = 64, 10
#: (in channels, out channels, input side, stride): ResNet-18's 3x3 convolutions at 32x32 inputs
SHAPES = [(128, 128, 4, 1), (128, 256, 4, 2), (256, 256, 2, 1), (256, 512, 2, 2), (512, 512, 1, 1)]
ROWS = [100, 500, 2000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--fits", type=int, default=0, help="rounds of the ResNet-18 fit, with and without")
    parser.add_argument("--smoke", action="store_true", help="the first two shapes against 100 rows, one call each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shapes, row_counts, repeats = (SHAPES[:2], ROWS[:1], 1) if args.smoke else (SHAPES, ROWS, 5)
    lines = [
        f"Command: `python benchmarks/ghost_choice.py`. Machine: {platform.machine()}, 1 torch thread, torch "
        f"{torch.__version__}. A batch of {BATCH} training samples, {K} class directions; milliseconds per "
        f"batch (median of {repeats}). *picks*: what `pays` chooses with the convolution's ghost_penalty "
        f"({ConvAlgebra.ghost_penalty}) and without it (1.0); ✓ where that is the faster one.",
        "",
        "| convolution | output positions | validation rows | ghost form | ghost ms | own product ms | "
        "by convolution ms | picks | picks without the penalty |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    right = {True: 0, False: 0}
    for c_in, c_out, side, stride in shapes:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        alg = ConvAlgebra(conv)
        out_side = conv(torch.zeros(1, c_in, side, side)).shape[-1]
        a = torch.randn(BATCH, c_in, side, side, generator=gen)
        d = torch.randn(BATCH, c_out, out_side, out_side, generator=gen)
        V = torch.randn(K, conv.weight.numel(), generator=gen)
        alg.in_shape = (c_in, side, side)  # as the probe sets it: the forms for this input size
        factors = alg.ghost_factors(a, [d])
        one = GhostFactors(factors.u[0], factors.delta[0], factors.in_size)
        prepared = alg.prepare(V)
        own = median_ms(lambda: alg.apply(a, [d], prepared), repeats)
        convolved = median_ms(lambda: alg._convolved_products(a, d, V), repeats)
        for n in row_counts:
            rows = alg.ghost_factors(torch.randn(n, c_in, side, side, generator=gen),
                                     [torch.randn(n, c_out, out_side, out_side, generator=gen)])
            mixing = torch.randn(K, n, generator=gen)
            ghost = median_ms(lambda: ghost_products(alg, alg.ghost_factors(a, [d]), rows, mixing), repeats)
            faster = ghost < own
            cells = []
            for penalty in (ConvAlgebra.ghost_penalty, 1.0):
                alg.ghost_penalty = penalty
                choice = pays(alg, one, n, K)
                right[penalty == 1.0] += choice == faster
                cells.append(("ghost" if choice else "own") + (" ✓" if choice == faster else ""))
            del alg.ghost_penalty
            form = "positions" if alg.by_positions() else "unfolded"
            lines.append(f"| {c_in}->{c_out}, stride {stride} | {out_side}x{out_side} | {n} | {form} | {ghost:.1f} | "
                         f"{own:.1f} | {convolved:.1f} | {cells[0]} | {cells[1]} |")
    total = len(shapes) * len(row_counts)
    lines += ["", f"The faster product picked: {right[False]} of {total} with the penalty, {right[True]} of {total} "
              "without it."]
    if args.fits:
        lines += ["", *fit_rounds(args.fits)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def fit_rounds(rounds: int) -> list[str]:
    """Seconds of the BatchNorm ResNet-18 row's default fit with and without the penalty, alternating."""
    import architectures as arch

    row = arch.ROWS["ResNet-18, BatchNorm"]
    data = tuple(part[:1000] if i in (0, 1, 4) else part for i, part in enumerate(arch.images()))
    arch.fit(row, tuple(part[:128] for part in data))  # warm-up
    seconds: dict[float, list[float]] = {ConvAlgebra.ghost_penalty: [], 1.0: []}
    scores = {}
    penalty = ConvAlgebra.ghost_penalty
    try:
        for _ in range(rounds):
            for p in list(seconds):
                ConvAlgebra.ghost_penalty = p
                start = time.perf_counter()
                scores[p] = arch.fit(row, data).class_contribution_
                seconds[p].append(time.perf_counter() - start)
    finally:
        ConvAlgebra.ghost_penalty = penalty
    scale = np.abs(scores[1.0]).max()
    return [f"The BatchNorm ResNet-18 default fit (benchmarks/architectures.py, 1,000 images, 3 epochs), {rounds} "
            f"rounds alternating: {statistics.median(seconds[penalty]):.1f} s with the penalty, "
            f"{statistics.median(seconds[1.0]):.1f} s without it (median); class contributions equal to "
            f"{np.abs(scores[penalty] - scores[1.0]).max() / scale:.1e} of their largest magnitude."]


if __name__ == "__main__":
    main()
