"""Fine-tuning a head on a frozen backbone, with the backbone's BatchNorm left in eval mode.

The usual transfer-learning script: a pretrained backbone (here a small BatchNorm
ResNet pretrained on part of the digits, since nothing may download), every
backbone parameter frozen and the backbone put in eval mode so that its BatchNorm
layers keep their running statistics, and a new linear head trained on noisy labels.
HydraLabelCleaner trains exactly that run: a submodule you put in eval mode stays
in eval mode, and frozen parameters cost nothing (only the head's factors are kept).

    python examples/frozen_backbone.py [--small]
"""

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import ResNet, count_parameters


class FineTuned(nn.Module):
    """A frozen backbone and a trainable linear head."""

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(n_features, n_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def pretrain(X, y, epochs: int) -> nn.Module:
    """Stand-in for downloaded weights: a ResNet trained on clean images; its layers up to the features."""
    torch.manual_seed(0)
    net = ResNet(n_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return nn.Sequential(*list(net.children())[:-1])  # everything but the classifier: 64 features per image


def main(small: bool) -> None:
    X, y = load_digits_images()
    X_source, X_target, y_source, y_target = train_test_split(X, y, test_size=0.6, stratify=y, random_state=0)
    X_train, X_val, y_train, y_val = train_test_split(X_target, y_target, test_size=200, stratify=y_target,
                                                      random_state=0)
    y_noisy, noise = make_label_noise(y_train, 0.3, random_state=0)

    backbone = pretrain(X_source, y_source, epochs=2 if small else 10)
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = FineTuned(backbone, 64, 10)
    model.backbone.eval()  # BatchNorm on its running statistics, as a fine-tuning script has it
    running_mean = backbone[1].running_mean.clone()
    print(f"trainable parameters: {count_parameters(model):,} of {sum(p.numel() for p in model.parameters()):,}")

    t0 = time.perf_counter()
    cleaner = HydraLabelCleaner(model, max_epochs=3 if small else 15, batch_size=32, lr=0.05,
                                drop_fraction="auto", random_state=0).fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
    seconds = time.perf_counter() - t0
    fitted = cleaner.module_
    print(f"fit in {seconds:.1f} s; validation accuracy {cleaner.history_['valid_accuracy'][-1]:.3f}")
    print("the backbone stayed in eval mode and its BatchNorm statistics did not move:",
          not fitted.backbone.training and torch.equal(fitted.backbone[1].running_mean, running_mean))
    print(f"AUROC against the {int(noise.sum())} flipped labels: the default score (label_quality_) "
          f"{roc_auc_score(noise, -cleaner.label_quality_):.3f}, the paper's C(i) (contribution_) "
          f"{roc_auc_score(noise, -cleaner.contribution_):.3f}")
    flagged = cleaner.label_issues_
    print(f"flagged {int(flagged.sum())} samples, {noise[flagged].mean():.0%} of them truly flipped; suggested "
          f"labels right for {np.mean(cleaner.suggested_label_[flagged & noise] == y_train[flagged & noise]):.0%} "
          "of the flipped ones")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(parser.parse_args().small)
