"""Reference networks: the paper's LeNet-5 and DenseNet-BC-40, a small CNN, an MLP, a small
BatchNorm ResNet, and two text classifiers over token ids.

The image networks take (batch, channels, height, width) (the MLP also flat
vectors), the text ones (batch, length) int64 token ids; all return logits
(batch, n_classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MLP",
    "BagOfTokens",
    "DenseNetBC",
    "LeNet5",
    "ResNet",
    "SmallCNN",
    "TokenTransformer",
    "count_parameters",
    "densenet_bc_40",
]


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


class _Block(nn.Module):
    """A basic residual block: two 3x3 convolutions with BatchNorm, a 1x1 shortcut where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Sequential):
    """A small ResNet with BatchNorm (He et al. 2016, CIFAR-style stem) for small images.

    A 3x3 stem, then one basic block per stage, each stage after the first
    halving the resolution and doubling the channels, global average pooling
    and a linear head. ``widths=(16, 32, 64)``: 77,754 parameters for 10
    classes.

    Parameters
    ----------
    n_classes : int, default=10
    in_channels : int, default=1
    widths : sequence of int, default=(16, 32, 64)
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)):
        stages, width = [], widths[0]
        for k, w in enumerate(widths):
            stages.append(_Block(width, w, 1 if k == 0 else 2))
            width = w
        super().__init__(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            *stages,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, n_classes),
        )


class BagOfTokens(nn.Module):
    """A bag-of-embeddings text classifier: ``nn.EmbeddingBag`` (mean) over the token ids, then a linear head.

    Parameters
    ----------
    vocab_size : int
    n_classes : int
    dim : int, default=64
    padding_idx : int, optional
        A token id that pads short documents (left out of the mean).
    """

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 64, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=padding_idx)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class TokenTransformer(nn.Module):
    """A small transformer text classifier: token and position embeddings, ``nn.TransformerEncoder``
    layers (batch first), mean pooling over the positions, a linear head.

    Parameters
    ----------
    vocab_size : int
    n_classes : int
    max_length : int
        Longest sequence (positions embedded).
    dim : int, default=64
    heads : int, default=4
    layers : int, default=2
    dropout : float, default=0.1
    """

    def __init__(self, vocab_size: int, n_classes: int, max_length: int, dim: int = 64, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # positions batch first like the ids, so that each sample's gradient of the table is its own
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head(self.encoder(self.embed(ids) + self.position(positions)).mean(1))
