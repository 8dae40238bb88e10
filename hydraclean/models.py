"""Reference networks: the paper's LeNet-5 and DenseNet-BC-40, a small CNN, an MLP.

All take images as (batch, channels, height, width) (the MLP also flat
vectors) and return logits (batch, n_classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "DenseNetBC", "LeNet5", "SmallCNN", "count_parameters", "densenet_bc_40"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class MLP(nn.Sequential):
    """Flatten, then fully connected ReLU layers.

    Parameters
    ----------
    n_features : int
        Input values per sample (after flattening).
    n_classes : int
    hidden : sequence of int, default=(128,)
    dropout : float, default=0.0
        Dropout after each hidden layer.
    """

    def __init__(self, n_features: int, n_classes: int, hidden: Sequence[int] = (128,), dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """A two-block CNN for 8x8 images (scikit-learn's digits): 13,706 parameters for 10 classes.

    Parameters
    ----------
    n_classes : int, default=10
    in_channels : int, default=1
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, n_classes),
        )


class LeNet5(nn.Sequential):
    """LeNet-5 (LeCun et al. 1998) as in the HYDRA paper: 61,706 parameters for 10 classes.

    The count holds for 32x32 inputs, or for 28x28 inputs (MNIST,
    Fashion-MNIST) with ``padding=2`` in the first convolution, which is what
    ``input_size=28`` (the default) builds. ReLU activations, max pooling.

    Parameters
    ----------
    n_classes : int, default=10
    in_channels : int, default=1
    input_size : {28, 32}, default=28
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        if input_size not in (28, 32):
            raise ValueError(f"LeNet5 takes 28x28 or 32x32 inputs, got input_size={input_size}.")
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2 if input_size == 28 else 0),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )


class _Bottleneck(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


class DenseNetBC(nn.Module):
    """DenseNet-BC (Huang et al. 2017) for 32x32 images, three dense blocks.

    Parameters
    ----------
    depth : int, default=40
        ``(depth - 4) / 6`` bottleneck layers per block.
    growth : int, default=12
    compression : float, default=0.5
        Channel reduction in the transition layers.
    n_classes : int, default=10
    in_channels : int, default=3
    """

    def __init__(
        self, depth: int = 40, growth: int = 12, compression: float = 0.5, n_classes: int = 10, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6k + 4, got {depth}.")
        per_block = (depth - 4) // 6
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(per_block):
                layers.append(_Bottleneck(channels, growth))
                channels += growth
            if block < 2:
                out = int(channels * compression)
                layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 1, bias=False), nn.AvgPool2d(2)]
                channels = out
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def densenet_bc_40(n_classes: int = 10, in_channels: int = 3) -> DenseNetBC:
    """The paper's "DenseNet-40": DenseNet-BC, depth 40, growth 12, compression 0.5."""
    return DenseNetBC(40, 12, 0.5, n_classes, in_channels)
