"""Each update rule is torch's optimizer step, bit for bit; options are checked with the fix named."""

import pytest
import torch
from torch.func import jacfwd

from hydraclean.optimizers import make_rule

CASES = [
    (torch.optim.SGD, {}, 0.9),
    (torch.optim.SGD, {}, 0.0),
    (torch.optim.SGD, {"nesterov": True}, 0.9),
    (torch.optim.SGD, {"dampening": 0.3}, 0.8),
    (torch.optim.Adam, {}, None),
    (torch.optim.Adam, {"amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}, None),
    (torch.optim.AdamW, {}, None),
    (torch.optim.AdamW, {"amsgrad": True}, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer,options,momentum", CASES)
def test_rule_steps_equal_torch_optim_bit_for_bit(optimizer, options, momentum, dtype):
    """Seven steps on two parameters, one of them with a zero gradient at step 3, against torch.optim."""
    rule, base = make_rule(optimizer, options, momentum=momentum or 0.9, lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, dtype=dtype, generator=g).requires_grad_(),
              torch.randn(4, dtype=dtype, generator=g).requires_grad_()]
    reference = optimizer(params, **rule.torch_options(base))
    w = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    state = rule.init(w)
    for t in range(1, 8):
        grads = [torch.randn(p.shape, dtype=dtype, generator=g) for p in params]
        if t == 3:
            grads[1].zero_()
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        reference.step()
        w, state = rule.step(w, state, torch.cat([grad.reshape(-1) for grad in grads]), t, base)
    assert torch.equal(w, torch.cat([p.detach().reshape(-1) for p in params]))


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_rule_is_differentiable_where_a_coordinate_never_had_a_gradient(optimizer):
    """sqrt(v) at v = 0 takes derivative 0: a coordinate without gradients gives no NaN in the hypergradient."""
    rule, base = make_rule(optimizer, {}, momentum=0.9, lr=0.01, weight_decay=0.1)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    state = rule.init(w)

    def step(x):
        w, m, v, g = x.split(2)
        new_w, (new_m, new_v) = rule.step(w, (m, v), g, 1, base)
        return torch.cat([new_w, new_m, new_v])

    J = jacfwd(step)(torch.cat([w, *state, torch.tensor([0.0, 0.5], dtype=torch.float64)]))
    assert torch.isfinite(J).all()


@pytest.mark.parametrize(
    "optimizer,options,message",
    [
        (torch.optim.RMSprop, {}, "optimizer=RMSprop is not supported.*SGD, torch.optim.Adam or torch.optim.AdamW"),
        (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), {}, "the class, not an instance"),
        (torch.optim.SGD, {"lr": 0.1}, "optimizer__lr is not an option here: pass lr="),
        (torch.optim.SGD, {"momentum": 0.5}, "pass momentum="),
        (torch.optim.Adam, {"weight_decay": 0.5}, "pass weight_decay="),
        (torch.optim.SGD, {"betas": (0.9, 0.99)}, "optimizer__betas is not supported for SGD.*dampening, nesterov"),
        (torch.optim.Adam, {"nesterov": True}, "optimizer__nesterov is not supported for Adam.*betas, eps, amsgrad"),
        (torch.optim.AdamW, {"fused": True}, "implementation switches"),
        (torch.optim.Adam, {"betas": (0.9, 1.0)}, r"betas\[1\]=1.0 must lie in \[0, 1\)"),
        (torch.optim.SGD, {"nesterov": True, "dampening": 0.1}, "Nesterov momentum needs"),
    ],
)
def test_unsupported_optimizers_and_options_name_what_is_supported(optimizer, options, message):
    with pytest.raises(ValueError, match=message):
        make_rule(optimizer, options, momentum=0.9, lr=None, weight_decay=None)


def test_defaults_are_sgds_and_torchs():
    assert make_rule(torch.optim.SGD, {}, momentum=0.9, lr=None, weight_decay=None)[1] == {"lr": 0.01,
                                                                                           "momentum": 0.9}
    rule, base = make_rule(torch.optim.AdamW, {}, momentum=0.9, lr=None, weight_decay=None)
    assert base == {"lr": 1e-3, "beta1": 0.9} and rule.weight_decay == 1e-2 and rule.beta2 == 0.999
    assert make_rule(torch.optim.Adam, {}, momentum=0.9, lr=None, weight_decay=None)[0].weight_decay == 0.0


@pytest.mark.parametrize("size,block", [(30, 7), (5003, 1024)])
@pytest.mark.parametrize("optimizer,options,momentum", CASES)
def test_the_in_place_step_is_the_pure_step_bit_for_bit(monkeypatch, optimizer, options, momentum, size, block):
    """Training updates one buffer block by block (a block smaller than the vector here, with vectorised
    loops and their tails in the larger case), by SGD's own in-place step or the pure step's: the same values."""
    from hydraclean import optimizers

    monkeypatch.setattr(optimizers, "STEP_BLOCK", block)
    rule, hyper = make_rule(optimizer, options, momentum=momentum, lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, generator=g)
    state = rule.init(w)
    w_pure, state_pure = w.clone(), tuple(s.clone() for s in state)
    for t in range(1, 4):
        grad = torch.randn(size, generator=g)
        w_pure, state_pure = rule.step(w_pure, state_pure, grad, t, hyper)
        optimizers.step_in_place(rule, w, state, grad, t, hyper)
        assert torch.equal(w, w_pure) and all(torch.equal(a, b) for a, b in zip(state, state_pure))
