"""Schedules resolved per step, against torch's own schedulers stepped in a plain training loop."""

import functools

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

from hydraclean.optimizers import make_rule
from hydraclean.schedules import ExponentialDecay, StepDecay, learning_rates, resolve_schedule

STEPS = [7, 7, 7, 7]  # four epochs of seven batches


def torch_loop(optimizer_class, make_scheduler, per_batch, lr=0.1, momentum=0.9, **options):
    """What a practitioner's loop uses at every step: the optimizer's values, stepping the scheduler as usual."""
    param = torch.nn.Parameter(torch.zeros(2))
    kwargs = dict(lr=lr, **options)
    if optimizer_class is torch.optim.SGD:
        kwargs["momentum"] = momentum
    optimizer = optimizer_class([param], **kwargs)
    scheduler = make_scheduler(optimizer)
    lrs, second = [], []
    for _ in STEPS:
        for _ in range(STEPS[0]):
            group = optimizer.param_groups[0]
            lrs.append(group["lr"])
            second.append(group["momentum"] if optimizer_class is torch.optim.SGD else group["betas"][0])
            param.grad = torch.ones(2)
            optimizer.step()
            if per_batch:
                scheduler.step()
        if not per_batch:
            scheduler.step()
    return np.array(lrs), np.array(second)


def resolved(optimizer_class, schedule, interval="auto", options=None, lr=0.1, momentum=0.9):
    rule, base = make_rule(optimizer_class, {}, momentum=momentum, lr=lr, weight_decay=None)
    values = resolve_schedule(schedule, rule=rule, base=base, steps_per_epoch=STEPS, options=options,
                              interval=interval)
    return values["lr"], values["momentum" if optimizer_class is torch.optim.SGD else "beta1"]


TOTAL, EPOCHS = sum(STEPS), len(STEPS)
CASES = {
    # name: (hydraclean's schedule, interval, options, the practitioner's scheduler on their optimizer, per batch)
    "cosine per epoch": (lr_scheduler.CosineAnnealingLR, "auto", {},
                         lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS), False),
    "cosine per batch": (lr_scheduler.CosineAnnealingLR, "batch", {"eta_min": 0.01},
                         lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.01), True),
    "'cosine'": ("cosine", "auto", {}, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL), True),
    "OneCycleLR": (lr_scheduler.OneCycleLR, "auto", {"pct_start": 0.25},
                   lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=TOTAL, pct_start=0.25), True),
    "LambdaLR": (lr_scheduler.LambdaLR, "auto", {"lr_lambda": lambda epoch: 0.5**epoch},
                 lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 0.5**epoch), False),
    "a one-argument callable": (lambda epoch: 1.0 / (1 + epoch), "auto", {},
                                lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)), False),
    "StepLR per batch": (lr_scheduler.StepLR, "batch", {"step_size": 5, "gamma": 0.5},
                         lambda o: lr_scheduler.StepLR(o, 5, 0.5), True),
    "LinearLR warm-up, then cosine": (
        lr_scheduler.SequentialLR, "batch",
        {"schedulers": [functools.partial(lr_scheduler.LinearLR, start_factor=0.1, total_iters=5),
                        lr_scheduler.CosineAnnealingLR], "milestones": [5]},
        lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
                                                lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - 5)], [5]), True),
    "ChainedScheduler": (
        lr_scheduler.ChainedScheduler, "epoch",
        {"schedulers": [functools.partial(lr_scheduler.ConstantLR, factor=0.5, total_iters=2),
                        functools.partial(lr_scheduler.ExponentialLR, gamma=0.9)]},
        lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
                                                 lr_scheduler.ExponentialLR(o, gamma=0.9)]), False),
}


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("case", CASES)
def test_torch_schedulers_give_torchs_own_sequences(case, optimizer_class):
    schedule, interval, options, make, per_batch = CASES[case]
    lrs, second = resolved(optimizer_class, schedule, interval, options)
    expected_lrs, expected_second = torch_loop(optimizer_class, make, per_batch)
    np.testing.assert_allclose(lrs, expected_lrs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(second, expected_second, rtol=1e-12)
    if case == "OneCycleLR":  # it cycles SGD's momentum and Adam's beta1
        assert np.ptp(second) > 0.05


def test_constant_and_factor_callables():
    np.testing.assert_array_equal(learning_rates(0.1, lambda e, s: 1.0, [3, 3]), np.full(6, 0.1))
    np.testing.assert_allclose(learning_rates(0.1, ExponentialDecay(0.5), [2, 2, 2]),
                               [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    np.testing.assert_allclose(learning_rates(1.0, StepDecay(step_size=2, gamma=0.1), [1, 1, 1, 1, 1]),
                               [1, 1, 0.1, 0.1, 0.01])
    np.testing.assert_allclose(learning_rates(2.0, lambda epoch, step: 1.0 / (1 + step), [3]), [2.0, 1.0, 2 / 3])
    lrs, momenta = resolved(torch.optim.SGD, "constant")
    np.testing.assert_array_equal(lrs, np.full(TOTAL, 0.1))
    np.testing.assert_array_equal(momenta, np.full(TOTAL, 0.9))


@pytest.mark.parametrize(
    "schedule,options,message",
    [
        ("linear", {}, "not a known schedule"),
        (lambda e, s: -1.0, {}, "negative or non-finite"),
        (lambda e, s: float("nan"), {}, "negative or non-finite"),
        (lr_scheduler.ReduceLROnPlateau, {}, "metrics seen during training"),
        ("constant", {"T_max": 3}, "not a torch scheduler class"),
        (lr_scheduler.StepLR, {"step_sise": 3}, "could not be built on SGD"),
        (lr_scheduler.SequentialLR, {"schedulers": [lambda o: None], "milestones": [2]}, "classes or functools"),
    ],
)
def test_bad_schedules_are_refused_with_the_fix(schedule, options, message):
    with pytest.raises(ValueError, match=message):
        resolved(torch.optim.SGD, schedule, options=options)


def test_a_scheduler_instance_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="pass the class instead"):
        resolved(torch.optim.SGD, lr_scheduler.StepLR(optimizer, 2))
