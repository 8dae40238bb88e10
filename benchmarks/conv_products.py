"""Which form a convolution's products with K directions take: direct, or per-sample gradients.

For each distinct convolution of torchvision's ResNet-18 on 32x32 images (found by a forward pass with
hooks: input size, channels, kernel, stride), a batch of 64 samples with seeded inputs and output gradients,
and K = 1, 2, 4 and 11 directions (11: the default fit's 10 class directions and their weighted sum), times

- *direct*: ``DirectForm.products`` of the form ``ConvAlgebra.prepare`` makes once per projection (the
  directions times the unfolded input without the rows that read only padding, or, at inputs smaller than
  the kernel's reach, the dense map between input and output positions), no per-sample gradient formed;
- *per-sample*: ``LayerAlgebra.apply``, the per-sample gradients in blocks of
  ``hydraclean.layers.GRADIENT_CHUNK_BYTES`` times the directions, and the same with 16 and 64 MiB blocks;

and marks what ``ConvAlgebra.apply`` picks (direct while ``K x P <= DIRECT_LIMIT``, P the output positions
per sample) with ✓ where that is the faster of the two at the library's block size. One torch thread,
median of 5 calls after one warm-up.

``--fits N``: then the default fits of benchmarks/architectures.py's BatchNorm and GroupNorm ResNet-18 rows on
their first 1,000 images with this choice and with the one before it (``DIRECT_LIMIT`` 256, 64 MiB blocks),
alternating, N rounds in one process, each round's plain training loop first (the scores agree to float32
rounding; only the time differs).

    python benchmarks/conv_products.py [--fits 2] [--smoke] [--out docs/_generated/conv_products.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import contextmanager

import torch
import torchvision
from torch import nn

from measure import emit, median_ms  # noqa: I001  (benchmarks/ is on sys.path when run as a script)
from hydraclean import layers
from hydraclean.layers import ConvAlgebra, DirectForm, LayerAlgebra

BATCH = 64
DIRECTIONS = [1, 2, 4, 11]
BLOCKS_MIB = [16, 64]
#: The choice before this one: direct products up to 256 directions x positions, 64 MiB blocks.
BEFORE = (256, 64 * 2**20)


def resnet_convolutions() -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """ResNet-18's convolutions at 32x32 inputs, one per distinct (module geometry, input size)."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    seen, found = set(), []

    def hook(module, args):
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, args[0].shape[2:])
        if key not in seen:
            seen.add(key)
            found.append((module, tuple(args[0].shape[1:])))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return found


@contextmanager
def choice(direct_limit: int | None = None, chunk_bytes: int | None = None):
    """The library's form choice with ``DIRECT_LIMIT`` and ``GRADIENT_CHUNK_BYTES`` set for the block (None:
    as they are)."""
    saved = layers.DIRECT_LIMIT, layers.GRADIENT_CHUNK_BYTES
    layers.DIRECT_LIMIT = saved[0] if direct_limit is None else direct_limit
    layers.GRADIENT_CHUNK_BYTES = saved[1] if chunk_bytes is None else chunk_bytes
    try:
        yield
    finally:
        layers.DIRECT_LIMIT, layers.GRADIENT_CHUNK_BYTES = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="two convolutions, 11 directions, one call each")
    parser.add_argument("--fits", type=int, default=0, help="rounds of the ResNet-18 fits, before and now")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    convs = resnet_convolutions()
    convs, directions, repeats = ((convs[1:2] + convs[-1:], DIRECTIONS[-1:], 1) if args.smoke
                                  else (convs, DIRECTIONS, 5))
    block = layers.GRADIENT_CHUNK_BYTES // 2**20
    lines = [
        f"Command: `python benchmarks/conv_products.py`. Machine: {platform.machine()}, 1 torch thread, torch "
        f"{torch.__version__}. ResNet-18's convolutions at 32x32 inputs, a batch of {BATCH}; milliseconds per "
        f"batch (median of {repeats}). *picks*: what `ConvAlgebra.apply` takes (direct while K x P <= "
        f"{layers.DIRECT_LIMIT}); ✓ where that is the faster of direct and per-sample in {block} MiB blocks.",
        "",
        "| convolution | input | P | K | direct | per-sample, " + f"{block} MiB blocks | "
        + " | ".join(f"per-sample, {m} MiB blocks" for m in BLOCKS_MIB) + " | picks |",
        "|---|---|---|---|---|---|" + "---|" * len(BLOCKS_MIB) + "---|",
    ]
    right = total = 0
    for module, shape in convs:
        alg = ConvAlgebra(module)
        a = torch.randn(BATCH, *shape, generator=gen)
        with torch.no_grad():
            d = torch.randn(module(a).shape, generator=gen)
        positions = d[0, 0].numel()
        for k in directions:
            V = torch.randn(k, alg.size, generator=gen)
            form = DirectForm.of(module, V, shape[1:], dense=True)
            direct = median_ms(lambda: form.products(a, d), repeats)
            per = median_ms(lambda: LayerAlgebra.apply(alg, a, [d], V), repeats)
            others = []
            for mib in BLOCKS_MIB:
                with choice(chunk_bytes=mib * 2**20):
                    others.append(median_ms(lambda: LayerAlgebra.apply(alg, a, [d], V), repeats))
            picks_direct = alg.takes_direct(k, positions)
            ok = picks_direct == (direct <= per)
            right, total = right + ok, total + 1
            kernel = "x".join(map(str, module.kernel_size))
            lines.append(f"| {module.in_channels}->{module.out_channels}, {kernel}, stride {module.stride[0]} | "
                         f"{shape[1]}x{shape[2]} | {positions} | {k} | {direct:.1f} | {per:.1f} | "
                         + " | ".join(f"{o:.1f}" for o in others)
                         + f" | {'direct' if picks_direct else 'per-sample'} {'✓' if ok else '✗'} |")
            print(lines[-1], flush=True)
    lines += ["", f"The choice takes the faster form on {right} of {total} cells."]
    if args.fits:
        lines += ["", *fit_rounds(args.fits)]
    emit(lines, args.out)


def fit_rounds(rounds: int) -> list[str]:
    """The ResNet-18 rows' default fits with the choice before this one and with this one, alternating."""
    import numpy as np

    import architectures as arch

    data = tuple(part[:1000] if i in (0, 1, 4) else part for i, part in enumerate(arch.images()))
    now = (layers.DIRECT_LIMIT, layers.GRADIENT_CHUNK_BYTES)
    lines = ["| row (1,000 images, 3 epochs) | plain training s | default fit s, before | default fit s, now | "
             "fit / plain, before | fit / plain, now | class contributions, largest difference / largest |",
             "|---|---|---|---|---|---|---|"]
    for name in ("ResNet-18, BatchNorm", "ResNet-18, GroupNorm"):
        row = arch.ROWS[name]
        arch.fit(row, tuple(part[:128] for part in data))  # warm-up
        plain, seconds, ratios, scores = [], {BEFORE: [], now: []}, {BEFORE: [], now: []}, {}
        for _ in range(rounds):
            start = time.perf_counter()
            arch.plain_training(row, data)
            plain.append(time.perf_counter() - start)
            for limits in seconds:
                with choice(*limits):
                    start = time.perf_counter()
                    scores[limits] = arch.fit(row, data).class_contribution_
                    seconds[limits].append(time.perf_counter() - start)
                ratios[limits].append(seconds[limits][-1] / plain[-1])
        diff = np.abs(scores[BEFORE] - scores[now]).max() / np.abs(scores[now]).max()
        lines.append(f"| {name} | {statistics.median(plain):.1f} | {statistics.median(seconds[BEFORE]):.1f} | "
                     f"{statistics.median(seconds[now]):.1f} | {statistics.median(ratios[BEFORE]):.2f}x | "
                     f"{statistics.median(ratios[now]):.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    return [f"Default fits, {rounds} rounds alternating (medians; ratios to the round's plain loop):", "", *lines]


if __name__ == "__main__":
    main()
