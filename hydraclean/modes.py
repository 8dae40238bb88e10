"""The train/eval mode of every submodule while a model trains.

Training runs each submodule in the mode the user's module has it in: a
submodule set to eval mode stays there (a frozen backbone's BatchNorm keeps its
running statistics and its dropout stays off, as in a fine-tuning script that
calls ``model.train(); backbone.eval()``). Every later pass over the run (a
replay, a projection at stored weights, the per-sample losses) uses the same
modes, recorded in the trajectory.
"""

from __future__ import annotations

from torch import nn

__all__ = ["set_modes", "training_modes"]


def training_modes(module: nn.Module) -> dict[str, bool]:
    """The train/eval mode of every submodule during training, as the module has them.

    A submodule the user set to eval mode inside a module in train mode stays in eval mode (a frozen
    backbone's BatchNorm keeps its running statistics, as a fine-tuning script that calls ``model.train();
    backbone.eval()`` runs it); a module passed in eval mode as a whole trains in train mode.
    """
    if not module.training:
        return {name: True for name, _ in module.named_modules()}
    return {name: m.training for name, m in module.named_modules()}


def set_modes(model: nn.Module, modes: dict[str, bool]) -> nn.Module:
    """Put every submodule of ``model`` in its mode of ``modes`` (train mode where it is not named)."""
    for name, m in model.named_modules():
        m.training = modes.get(name, True)
    return model
