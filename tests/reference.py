"""Independent, deliberately plain references for the HYDRA math.

Nothing here uses hydraclean's gradients, optimizers or hypergradient code: the
SGD, Adam and AdamW updates are written out by hand, per-sample gradients come
from one backward pass per sample, and the recursions loop over samples and
steps in Python. Only the recorded run (batches, per-step hyperparameters,
seeds, the optimizer's fixed hyperparameters) is shared: it is the input.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call


@contextlib.contextmanager
def seeded(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def split(flat, module):
    """Flat vector -> {name: tensor} in named_parameters order (autograd-friendly)."""
    out, start = {}, 0
    for name, p in module.named_parameters():
        out[name] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def batches(traj):
    for epoch, perm in enumerate(traj.order):
        for s in range(0, perm.shape[0], traj.batch_size):
            yield torch.as_tensor(perm[s : s + traj.batch_size])


def sgd_update(w, v, g, t, hyper, rule):
    """torch.optim.SGD written out (momentum, dampening, Nesterov, L2 weight decay); t counts from 1."""
    lr, p = hyper["lr"], hyper["momentum"]
    d = g + rule.weight_decay * w
    if p:
        v = d if t == 1 else p * v + (1 - rule.dampening) * d
        d = d + p * v if rule.nesterov else v
    return w - lr * d, (v,)


def adam_update(w, state, g, t, hyper, rule):
    """torch.optim.Adam / AdamW written out from the papers' formulas (no amsgrad); t counts from 1."""
    m, v = state
    lr, b1, b2 = hyper["lr"], hyper["beta1"], rule.beta2
    if rule.decoupled:
        w = w * (1 - lr * rule.weight_decay)
    else:
        g = g + rule.weight_decay * w
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    # where a coordinate never had a gradient, v_hat = 0 and sqrt has no derivative: take 0 there (the
    # documented convention), where plain autograd would give 0 * inf = NaN
    root = torch.where(v_hat > 0, torch.sqrt(torch.where(v_hat > 0, v_hat, torch.ones_like(v_hat))), 0.0)
    return w - lr * m_hat / (root + rule.eps), (m, v)


def optimizer_update(w, state, g, t, hyper, rule):
    if type(rule).__name__ == "SGD":
        return sgd_update(w, state[0], g, t, hyper, rule)
    return adam_update(w, state, g, t, hyper, rule)


def hyper_at(traj, t):
    return {k: float(v[t]) for k, v in traj.hyper.items()}


def unrolled_weights(module, w0, X, y, traj, eps, criterion, hessian="exact"):
    """w_T as a differentiable function of the sample weights eps (N,).

    Mini-batch loss: sum_{i in B} (1/b + (N/b) eps_i) l_i, then the optimizer written out by hand;
    create_graph keeps every step differentiable with respect to eps. hessian="free" takes each step's
    gradient at a detached copy of the weights: it depends on eps through the sample weights only, as
    DESIGN.md section 7 defines the Hessian-free hypergradient (every derivative of the update kept).
    """
    n = X.shape[0]
    w = w0.clone() if w0.requires_grad else w0.clone().requires_grad_(True)
    state = None
    for t, idx in enumerate(batches(traj)):
        b = idx.numel()
        at = w if hessian == "exact" else w.detach().requires_grad_(True)
        with seeded(traj.seeds[t]):
            losses = criterion(functional_call(module, split(at, module), (X[idx],)), y[idx])
        loss = ((1.0 / b + (n / b) * eps[idx]) * losses).sum()
        (g,) = torch.autograd.grad(loss, at, create_graph=True)
        if state is None:
            state = tuple(torch.zeros_like(w0) for _ in range(1 if type(traj.rule).__name__ == "SGD" else 2))
        w, state = optimizer_update(w, state, g, t + 1, hyper_at(traj, t), traj.rule)
    return w


def mean_sample_losses(module, X, y, traj, criterion, aum_dir=None):
    """Each sample's training loss and softmax output averaged over the epochs, by the hand-written loop;
    with ``aum_dir``, also the area under the margin by the ``aum`` package (its authors' calculator, fed
    every step's logits)."""
    w, state = flat_params(module), None
    total, proba = torch.zeros(X.shape[0], dtype=X.dtype), None
    calculator = None
    if aum_dir is not None:
        from aum import AUMCalculator

        calculator = AUMCalculator(str(aum_dir), compressed=True)
    for t, idx in enumerate(batches(traj)):
        wr = w.clone().requires_grad_(True)
        with seeded(traj.seeds[t]):
            logits = functional_call(module, split(wr, module), (X[idx],))
        losses = criterion(logits, y[idx])
        (g,) = torch.autograd.grad(losses.mean(), wr)
        total[idx] += losses.detach()
        proba = torch.zeros(X.shape[0], logits.shape[1], dtype=X.dtype) if proba is None else proba
        proba[idx] += torch.softmax(logits.detach(), 1)
        if calculator is not None:
            calculator.update(logits.detach(), y[idx], idx.tolist())
        if state is None:
            state = tuple(torch.zeros_like(w) for _ in range(1 if type(traj.rule).__name__ == "SGD" else 2))
        w, state = optimizer_update(w, state, g, t + 1, hyper_at(traj, t), traj.rule)
    out = total / traj.order.shape[0], proba / traj.order.shape[0]
    if calculator is None:
        return out
    aum = torch.tensor([calculator.sums[i] / calculator.counts[i] for i in range(X.shape[0])], dtype=X.dtype)
    return (*out, aum)


def val_loss(module, w, X_val, y_val, criterion):
    module.eval()
    out = criterion(functional_call(module, split(w, module), (X_val,)), y_val).mean()
    module.train()
    return out


def unrolled_contributions(module, X, y, X_val, y_val, traj, criterion, hessian="exact", nabla=True):
    """C(i) = -(1/N) dL_val(w_T(eps))/d eps_i at eps = 0, nabla_T (N, |w|) (or None) and w_T."""
    n = X.shape[0]
    module.train()
    w0 = flat_params(module).requires_grad_(True)
    eps = torch.zeros(n, dtype=X.dtype, requires_grad=True)
    w_T = unrolled_weights(module, w0, X, y, traj, eps, criterion, hessian)
    (dL,) = torch.autograd.grad(val_loss(module, w_T, X_val, y_val, criterion), eps, retain_graph=True)
    jac = None
    if nabla:
        jac = torch.stack(
            [torch.autograd.grad(w_T[k], eps, retain_graph=True)[0] for k in range(w_T.numel())], dim=1
        ).detach()
    return -dL / n, jac, w_T.detach()


def class_contributions(module, X, y, X_val, y_val, traj, criterion, n_classes, hessian="exact"):
    """C(i, c) for every class: one unrolled run, one gradient per class's mean validation loss."""
    n = X.shape[0]
    module.train()
    w0 = flat_params(module).requires_grad_(True)
    eps = torch.zeros(n, dtype=X.dtype, requires_grad=True)
    w_T = unrolled_weights(module, w0, X, y, traj, eps, criterion, hessian)
    cols = []
    for c in range(n_classes):
        rows = y_val == c
        (dL,) = torch.autograd.grad(val_loss(module, w_T, X_val[rows], y_val[rows], criterion), eps,
                                    retain_graph=True)
        cols.append(-dL / n)
    return torch.stack(cols, 1)


def finite_difference_contributions(module, X, y, X_val, y_val, traj, criterion, samples, h=1e-5):
    """-(1/N) dL_val/d eps_i by central differences of the hand-written training run (no autograd through it)."""
    n = X.shape[0]
    module.train()
    w0 = flat_params(module)
    out = []
    for i in samples:
        values = []
        for sign in (1.0, -1.0):
            eps = torch.zeros(n, dtype=X.dtype)
            eps[i] = sign * h
            w_T = unrolled_weights(module, w0, X, y, traj, eps, criterion).detach()
            values.append(float(val_loss(module, w_T, X_val, y_val, criterion)))
        out.append(-(values[0] - values[1]) / (2 * h) / n)
    return torch.tensor(out, dtype=torch.float64)


def closed_form_coefficients(lrs, momentum, weight_decay):
    """SGD's Hessian-free coefficients c_t = e1' M_T ... M_{t+1} b_t (DESIGN.md section 2), derived by hand."""
    p, lam = float(momentum), float(weight_decay)
    c = [0.0] * len(lrs)
    r0, r1 = 1.0, 0.0
    for t in range(len(lrs) - 1, -1, -1):
        eta = float(lrs[t])
        c[t] = -eta * r0 + r1
        r0, r1 = r0 * (1.0 - eta * lam) + r1 * lam, -r0 * eta * p + r1 * p
    return torch.tensor(c, dtype=torch.float64)


def brute_per_sample_grads(module, w, xb, yb, seed, criterion):
    """(b, |w|): one backward pass per sample through one batch forward (step's mask, batch stats)."""
    wr = w.detach().clone().requires_grad_(True)
    with seeded(seed):
        losses = criterion(functional_call(module, split(wr, module), (xb,)), yb)
    rows = [torch.autograd.grad(losses[k], wr, retain_graph=True)[0] for k in range(xb.shape[0])]
    return torch.stack(rows), losses.detach()


def free_recurrence(module, X, y, X_val, y_val, traj, criterion, inputs=None):
    """Hessian-free C(i): per-sample state vectors (nabla_i, dv_i) updated at every step.

    ``inputs(t, idx)``, when given, supplies step t's batch instead of ``X[idx]`` (augmented data).
    """
    n = y.shape[0]
    module.train()
    w = flat_params(module)
    v = torch.zeros_like(w)
    nabla = torch.zeros(n, w.numel(), dtype=w.dtype)
    dv = torch.zeros_like(nabla)
    lam = traj.rule.weight_decay
    for t, idx in enumerate(batches(traj)):
        b, eta, p = idx.numel(), float(traj.lrs[t]), float(traj.hyper["momentum"][t])
        xb = X[idx] if inputs is None else inputs(t, idx)
        grads, _ = brute_per_sample_grads(module, w, xb, y[idx], traj.seeds[t], criterion)
        for i in range(n):  # plain loop over every sample, in batch or not
            u = torch.zeros_like(w)
            hits = (idx == i).nonzero()
            if hits.numel():
                u = (n / b) * grads[int(hits[0])]
            dv[i] = p * dv[i] + lam * nabla[i] + u
            nabla[i] = nabla[i] - eta * dv[i]
        g = grads.mean(0) + lam * w
        v = p * v + g
        w = w - eta * v
    wr = w.clone().requires_grad_(True)
    (g_val,) = torch.autograd.grad(val_loss(module, wr, X_val, y_val, criterion), wr)
    return -(nabla @ g_val) / n, nabla, w


def relative_error(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def tiny_mlp(d_in=3, n_classes=3, hidden=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)).double()


def tiny_bn_cnn(n_classes=3, seed=0, track_running_stats=True):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=track_running_stats),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(3 * 3 * 3, n_classes),
    ).double()


def tiny_conv_net(n_classes=3, seed=0):
    """Convolutions (strided, dilated, padded), in-place ReLU, dropout and linear layers; no BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(2, 3, 3, stride=2, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(3 * 2 * 2, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, n_classes),
    ).double()


class PositionsNet(nn.Module):
    """A Linear layer applied at every position (input (b, P, d)), then a mean and a classifier."""

    def __init__(self, d_in=3, n_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(d_in, 4)
        self.head = nn.Linear(4, n_classes, bias=False)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(1))


class SharedLayerNet(nn.Module):
    """One Linear layer called twice in a forward pass (shared weights)."""

    def __init__(self, d=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.shared = nn.Linear(d, d)
        self.double()

    def forward(self, x):
        return self.shared(torch.tanh(self.shared(x)))


def eval_per_sample_grads(module, w, X, y, criterion):
    """(n, |w|) gradients of each sample's loss in eval mode, one backward pass each."""
    module.eval()
    rows = []
    for k in range(X.shape[0]):
        wr = w.detach().clone().requires_grad_(True)
        loss = criterion(functional_call(module, split(wr, module), (X[k : k + 1],)), y[k : k + 1]).sum()
        rows.append(torch.autograd.grad(loss, wr)[0])
    module.train()
    return torch.stack(rows)
