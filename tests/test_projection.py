"""Per-layer algebra and per-step products against brute-force per-sample gradients, in float64."""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean.gradients import flatten, parameter_dict, unflatten
from hydraclean.layers import (
    AttentionAlgebra,
    ConvAlgebra,
    DirectForm,
    EmbeddingAlgebra,
    GhostFactors,
    EmbeddingBagAlgebra,
    LayerAlgebra,
    LinearAlgebra,
    ModuleAlgebra,
    NormAlgebra,
    algebra_for,
    conv2d_sample_gradients,
)
from hydraclean.projection import (
    FunctionalProjector,
    LayerFactorProjector,
    constant_statistics,
    make_projector,
    probe_layers,
)

from . import reference as ref

CE = nn.CrossEntropyLoss(reduction="none")


def batch(shape, n=5, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.arange(n) % n_classes


def brute(module, xb, yb, directions, seed=7):
    grads, _ = ref.brute_per_sample_grads(module, ref.flat_params(module), xb, yb, seed, CE)
    return grads @ directions.T


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_products(module, xb, yb, n_directions=3, seed=7, **probe):
    """The layer route's per-sample products at the module's weights and the brute-force ones."""
    plan = probe_layers(module, CE, xb, yb, **probe)
    assert plan is not None
    V = torch.randn(n_directions, trainable(module), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    projector = LayerFactorProjector(module, CE, V, xb.shape[0], plan, constant_stats=probe.get("constant_stats",
                                                                                                 False))
    # at weights that are views of one flat vector, as when scoring walks a stored run
    params = parameter_dict(module)
    with ref.seeded(seed):
        projector.add(unflatten(flatten(params), params), torch.arange(xb.shape[0]), xb, yb, 1.0)
    return plan, projector.result(), V


def brute_trainable(module, xb, yb, V, seed=7):
    """Brute force over the trainable parameters only (frozen ones have no hypergradient)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = dict(module.named_parameters())
    rows = []
    with ref.seeded(seed):
        losses = CE(torch.func.functional_call(module, params, (xb,)), yb)
    for i in range(xb.shape[0]):
        grads = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for g, n in zip(grads, names)]))
    return torch.stack(rows) @ V.T


class Tokens(nn.Module):
    """Token ids (b, L) -> Embedding -> mean over positions -> Linear."""

    def __init__(self, vocab=11, dim=4, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, 3)
        self.double()

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class Bags(nn.Module):
    def __init__(self, mode="mean", padding_idx=None, weighted=False):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(11, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)
        self.weighted = weighted
        self.double()

    def forward(self, ids):
        w = None
        if self.weighted:
            w = (ids.double() + 1) / 10
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=w)))


class Encoder(nn.Module):
    """Token ids -> Embedding -> two TransformerEncoderLayers (attention dropout on) -> mean -> Linear."""

    def __init__(self, batch_first=True, dropout=0.2):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Embedding(13, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, ids):
        x = self.embed(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.encoder(x)
        return self.head(h.mean(1 if self.batch_first else 0))


class Scaled(nn.Module):
    """A module with a parameter of its own outside any known layer type."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale + self.scale**2


def ids(n=5, length=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g), torch.arange(n) % 3


def seq(*layers):
    torch.manual_seed(0)
    return nn.Sequential(*layers).double()


CASES = {
    "linear, no bias": (lambda: seq(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)), lambda: batch((3,)),
                        [LinearAlgebra, LinearAlgebra]),
    "linear over positions": (lambda: ref.PositionsNet(), lambda: batch((6, 3)), [LinearAlgebra, LinearAlgebra]),
    "conv1d, groups and 'same'": (lambda: seq(nn.Conv1d(2, 4, 3, padding="same", groups=2), nn.Tanh(),
                                              nn.Flatten(), nn.Linear(24, 3)), lambda: batch((2, 6)),
                                  [ConvAlgebra, LinearAlgebra]),
    "conv2d, groups, reflect padding": (lambda: seq(nn.Conv2d(2, 4, 3, groups=2, padding=1, padding_mode="reflect"),
                                                    nn.ReLU(inplace=True), nn.Conv2d(4, 2, 2, stride=2),
                                                    nn.Flatten(), nn.Dropout(0.3), nn.Linear(18, 3)),
                                        lambda: batch((2, 6, 6)), [ConvAlgebra, ConvAlgebra, LinearAlgebra]),
    "conv2d, 'same' with an even kernel": (lambda: seq(nn.Conv2d(1, 2, 4, padding="same"), nn.Flatten(),
                                                       nn.Linear(50, 3)), lambda: batch((1, 5, 5)),
                                           [ConvAlgebra, LinearAlgebra]),
    "embedding": (lambda: Tokens(), lambda: ids(), [EmbeddingAlgebra, LinearAlgebra]),
    "embedding with padding_idx": (lambda: Tokens(padding_idx=0), lambda: ids(), [EmbeddingAlgebra, LinearAlgebra]),
    "embedding bag, mean": (lambda: Bags(), lambda: ids(), [EmbeddingBagAlgebra, LinearAlgebra]),
    "embedding bag, sum, weighted": (lambda: Bags("sum", weighted=True), lambda: ids(),
                                     [EmbeddingBagAlgebra, LinearAlgebra]),
    "embedding bag, mean, padding_idx": (lambda: Bags(padding_idx=0), lambda: ids(),
                                         [EmbeddingBagAlgebra, LinearAlgebra]),
    "layer norm": (lambda: seq(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), lambda: batch((3,)),
                   [LinearAlgebra, NormAlgebra, LinearAlgebra]),
    "group norm, instance norm": (lambda: seq(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True),
                                              nn.Flatten(), nn.Linear(36, 3)), lambda: batch((1, 5, 5)),
                                  [ConvAlgebra, NormAlgebra, NormAlgebra, LinearAlgebra]),
    "attention, batch first": (lambda: Encoder(True), lambda: ids(length=4, vocab=13),
                               [EmbeddingAlgebra] + [AttentionAlgebra, LinearAlgebra, LinearAlgebra, NormAlgebra,
                                                     NormAlgebra] * 2 + [LinearAlgebra]),
    "attention, sequence first": (lambda: Encoder(False), lambda: ids(length=4, vocab=13),
                                  [EmbeddingAlgebra] + [AttentionAlgebra, LinearAlgebra, LinearAlgebra, NormAlgebra,
                                                        NormAlgebra] * 2 + [LinearAlgebra]),
    "a module of its own": (lambda: seq(nn.Linear(3, 4), Scaled(4), nn.Linear(4, 3)), lambda: batch((3,)),
                            [LinearAlgebra, ModuleAlgebra, LinearAlgebra]),
    "shared layer": (lambda: ref.SharedLayerNet(), lambda: batch((3,)), [LinearAlgebra]),
}


@pytest.mark.parametrize("case", CASES)
def test_every_layer_class_equals_brute_force_per_sample_gradients(case):
    make, data, algebras = CASES[case]
    module = make().train()
    xb, yb = data()
    plan, P, V = layer_products(module, xb, yb)
    assert [p.algebra for p in plan] == algebras
    assert ref.relative_error(P, brute_trainable(module, xb, yb, V)) < 1e-10


def test_token_models_hypergradient_contributions_equal_the_plain_recurrence():
    """The layer route's hypergradient through training, for an embedding and a transformer over token ids."""
    from hydraclean.contribution import fit_contributions
    from hydraclean.training import plan_trajectory

    for module, (X, y) in ((Tokens(), ids(8)), (Encoder(dropout=0.0), ids(8, length=4, vocab=13))):
        Xv, yv = ids(5, length=X.shape[1], vocab=13 if isinstance(module, Encoder) else 11, seed=1)
        traj = plan_trajectory(8, batch_size=3, max_epochs=2, lr=0.1, weight_decay=0.01, seed=0)
        C_ref, _, _ = ref.free_recurrence(module, X, y, Xv, yv, traj, CE)
        result = fit_contributions(module, X, y, Xv, yv, criterion=CE, trajectory=plan_trajectory(
            8, batch_size=3, max_epochs=2, lr=0.1, weight_decay=0.01, seed=0))
        assert ref.relative_error(result.contribution, C_ref) < 1e-9, type(module).__name__


def test_frozen_layers_have_no_factors_and_an_eval_mode_batchnorm_keeps_the_layer_route():
    """A head on a frozen backbone whose BatchNorm the user put in eval mode: only the head is a layer."""
    backbone = seq(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    backbone[1].running_mean.uniform_(-0.2, 0.2)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    module = nn.Sequential(backbone, seq(nn.Linear(27, 3))).train()
    module[0].eval()
    xb, yb = batch((1, 5, 5))
    plan, P, V = layer_products(module, xb, yb)
    assert [p.algebra for p in plan] == [LinearAlgebra] and trainable(module) == 84
    assert ref.relative_error(P, brute_trainable(module, xb, yb, V)) < 1e-10


def test_batchnorm_in_train_mode_is_refused_unless_its_statistics_are_held_constant():
    module = ref.tiny_bn_cnn().train()
    xb, yb = batch((1, 5, 5))
    assert probe_layers(module, CE, xb, yb) is None  # the samples interact through the batch statistics
    plan, P, V = layer_products(module, xb, yb, constant_stats=True)
    assert [p.algebra for p in plan] == [ConvAlgebra, NormAlgebra, LinearAlgebra]
    held = constant_statistics(ref.tiny_bn_cnn().train())  # the same outputs, statistics held in the derivative
    plain = ref.tiny_bn_cnn().train()
    with ref.seeded(7):
        out = held(xb)
    with ref.seeded(7):
        assert torch.allclose(out, plain(xb))
    assert ref.relative_error(P, brute_trainable(held, xb, yb, V)) < 1e-10
    assert ref.relative_error(P, brute_trainable(module, xb, yb, V)) > 1e-3  # and differ from the exact ones


def test_a_parameter_used_outside_its_layer_is_refused():
    """Weights tied by hand (the head reuses the embedding table): the probe sees the products disagree."""

    class Tied(Tokens):
        def forward(self, ids):
            return torch.tanh(self.embed(ids)).mean(1) @ self.embed.weight[:3].T + self.head(
                self.embed(ids).mean(1))

    xb, yb = ids()
    assert probe_layers(Tied(), CE, xb, yb) is None


@pytest.mark.parametrize("module", [nn.Embedding(5, 2, max_norm=1.0), nn.Embedding(5, 2, scale_grad_by_freq=True),
                                    nn.EmbeddingBag(5, 2, mode="max"), nn.Conv2d(1, 1, 1)])
def test_options_a_layer_class_cannot_serve_go_to_the_module_route(module):
    expected = ConvAlgebra if isinstance(module, nn.Conv2d) else ModuleAlgebra
    assert algebra_for(module) is expected


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", ["conv", "positions"])
def test_ghost_products_equal_directions_made_of_validation_gradients(monkeypatch, bias, net):
    """Directions that combine validation samples' own eval-mode gradients (a mean, class means, single rows):
    the ghost products of Linear layers (one position or many) and Conv2d layers (padded, strided), with and
    without bias, equal the products with the directions themselves."""
    from hydraclean import projection
    from hydraclean.ghost import GhostRows

    if net == "conv":
        module, shape = ref.tiny_conv_net().train(), (1, 6, 6)
        layers = [module[0], module[2], module[6], module[8]]
    else:
        module, shape = ref.PositionsNet().train(), (6, 3)
        layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not bias:
        for layer in layers:
            layer.bias = None
    xb, yb = batch(shape)
    X_rows, y_rows = batch(shape, n=4, seed=3)
    G = ref.eval_per_sample_grads(module, ref.flat_params(module), X_rows, y_rows, CE)
    mixing = torch.tensor([[0.25] * 4, [0.5, 0, 0, 0.5], [0, 1.0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
    V = mixing @ G
    monkeypatch.setattr(projection, "pays", lambda *args: True)  # every layer that has the form takes it
    projector = LayerFactorProjector(module, CE, V, 5, probe_layers(module, CE, xb, yb),
                                     GhostRows(module, X_rows, y_rows, mixing))
    assert len(projector.row_factors) == len(layers)
    with ref.seeded(7):
        projector.add(parameter_dict(module), torch.arange(5), xb, yb, 2.0)
    assert ref.relative_error(projector.result(), 2.0 * brute(module, xb, yb, V)) < 1e-12


def test_ghost_products_of_a_batchnorm_model_read_the_trained_running_statistics(monkeypatch):
    """The validation rows' ghost factors are eval-mode gradients at w_T, BatchNorm's running statistics
    included: a fit whose every layer takes the ghost product equals one whose every layer takes its own
    product with the class directions (they differed by 3% when the rows were formed with the
    architecture's initial statistics)."""
    from sklearn.datasets import load_digits

    from hydraclean import HydraLabelCleaner, projection

    X, y = load_digits(return_X_y=True)
    X = (X / 16).reshape(-1, 1, 8, 8).astype(np.float32)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    scores = {}
    for ghost in (True, False):
        monkeypatch.setattr(projection, "pays", lambda *args, ghost=ghost: ghost)
        cleaner = HydraLabelCleaner(net(), max_epochs=2, batch_size=64, lr=0.05, random_state=0)
        scores[ghost] = cleaner.fit(X[:300], y[:300], X_val=X[300:400], y_val=y[300:400]).class_contribution_
    assert np.abs(scores[True] - scores[False]).max() < 1e-5 * np.abs(scores[False]).max()


def test_ghost_products_are_taken_where_they_cost_less():
    """A wide convolution at one output position against 10 class directions: the ghost product (n_val
    (in + out) per sample) beats the directions' own (10 in out); at 64 positions it does not. At 4
    positions (ResNet-18's third stage on 32x32 images) the multiply-adds of the unfolded input's ghost
    product are level against 500 rows, and the convolution, twice as fast per multiply-add, wins; against
    100 rows the ghost product does, and by input positions (the probe's 2x2 inputs) against 500."""
    from hydraclean.ghost import pays

    alg = ConvAlgebra(nn.Conv2d(256, 512, 3, padding=1))
    one = (torch.zeros(1, 256 * 9), torch.zeros(1, 512))
    many = (torch.zeros(64, 256 * 9), torch.zeros(64, 512))
    assert pays(alg, one, 500, 10) and not pays(alg, many, 500, 10)
    stage3 = ConvAlgebra(nn.Conv2d(256, 256, 3, padding=1))
    four = (torch.zeros(4, 256 * 9), torch.zeros(4, 256))
    assert not pays(stage3, four, 500, 10) and pays(stage3, four, 100, 10)
    stage3.in_shape = (256, 2, 2)  # by input positions: 16 (in + out) + 36 per pair against 16 (9 in + out)
    by_positions = stage3.ghost_factors(torch.zeros(1, 256, 2, 2), [torch.zeros(1, 256, 2, 2)])
    assert pays(stage3, GhostFactors(by_positions.u[0], by_positions.delta[0], (2, 2)), 500, 10)
    head = LinearAlgebra(nn.Linear(512, 10))
    assert not pays(head, (torch.zeros(1, 512), torch.zeros(1, 10)), 500, 10)
    assert pays(head, (torch.zeros(1, 512), torch.zeros(1, 10)), 500, 1010)  # the cluster strategy's rows


@pytest.mark.parametrize("accumulate_bytes", [0, 10**6])
def test_dense_layers_summed_or_projected_every_step_agree(accumulate_bytes):
    """With room, the convolutions' directions are prepared (contiguous, or their direct form) and the
    GroupNorm's per-sample gradients summed; without, every layer takes the directions as given."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.ReLU(inplace=True),
                           nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)).double()
    xb, yb = batch((1, 6, 6))
    V = torch.randn(4, trainable(module), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([4, 0, 7, 2, 5])
    projector = LayerFactorProjector(module, CE, V, 9, probe_layers(module, CE, xb, yb),
                                     accumulate_bytes=accumulate_bytes)
    assert sorted(projector.sums) == ([1] if accumulate_bytes else [])
    assert sorted(projector.prepared) == ([0, 2, 3] if accumulate_bytes else [])
    if accumulate_bytes:
        assert isinstance(projector.prepared[2], DirectForm)  # 3x3 output positions x 4 directions
    with ref.seeded(7):
        projector.add(parameter_dict(module), idx, xb, yb, 0.5)
    expected = torch.zeros(9, 4, dtype=torch.float64)
    expected[idx] = 0.5 * brute(module, xb, yb, V)
    assert ref.relative_error(projector.result(), expected) < 1e-12


def test_without_a_plan_the_functional_route_serves_any_model():
    module = ref.tiny_bn_cnn().train()
    V = torch.zeros(1, trainable(module), dtype=torch.float64)
    assert isinstance(make_projector(module, CE, V, 2, None), FunctionalProjector)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(1, 0), bias=False),
        nn.Conv2d(3, 5, 1),  # the Linear-over-positions route
        nn.Conv2d(3, 5, 1, stride=2),
        nn.Conv2d(40, 2, 3, padding=1),  # unfolded input above UNFOLD_LIMIT: the grouped convolution
        nn.Conv2d(64, 2, 3, stride=2, dilation=2, padding=2),
    ],
)
def test_conv_sample_gradients_equal_one_backward_per_sample(conv):
    conv = conv.double()
    size = (7, 6) if conv.in_channels < 40 else (30, 30)
    a = torch.randn(4, conv.in_channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = torch.randn_like(conv(a)).detach()
    expected = []
    for i in range(4):
        expected.append(torch.autograd.grad(conv(a[i : i + 1]), conv.weight, delta[i : i + 1])[0].reshape(-1))
    got = conv2d_sample_gradients(conv, a, delta).reshape(4, -1)
    assert ref.relative_error(got, torch.stack(expected)) < 1e-12


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(4, 4, (3, 2), dilation=(2, 1), padding="same", groups=4),
        nn.Conv1d(4, 6, 3, padding="same", groups=2, padding_mode="circular"),
    ],
)
@pytest.mark.parametrize("k", [2, 300])
def test_conv_products_by_convolving_the_directions_equal_per_sample_gradients(conv, k, monkeypatch):
    """Few directions x positions: the inputs convolved with the directions; many: per-sample gradients."""
    from hydraclean import layers

    conv = conv.double()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, *((5, 4) if isinstance(conv, nn.Conv2d) else (6,)), dtype=torch.float64, generator=g)
    delta = torch.randn_like(conv(a)).detach()
    alg = ConvAlgebra(conv)
    V = torch.randn(k, alg.size, dtype=torch.float64, generator=g)
    params = [p for p in conv.parameters()]
    expected = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
        conv(a[i : i + 1]), params, delta[i : i + 1])]) for i in range(5)]) @ V.T
    assert alg.takes_direct(k, delta[0, 0].numel()) == (k == 2)
    assert ref.relative_error(alg.apply(a, [delta], V), expected) < 1e-12
    # the per-sample gradients in blocks of two samples, the last of one (the block is bytes, not the batch)
    monkeypatch.setattr(layers, "GRADIENT_CHUNK_BYTES", 2 * alg.size * a.element_size())
    assert ref.relative_error(LayerAlgebra.apply(alg, a, [delta], V), expected) < 1e-12


@pytest.mark.parametrize("side,conv,form", [
    (1, nn.Conv2d(3, 5, 3, padding=1), "unfolded"),  # a ResNet's fourth stage: 8 of 9 taps read only padding
    (2, nn.Conv2d(3, 5, 3, padding=1), "dense"),  # 4 input positions against 9 taps reading them
    (2, nn.Conv2d(3, 5, 3, stride=2, padding=1), "unfolded"),  # 2x2 -> 1x1: 4 taps read the input, 4 positions
    (3, nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=False), "unfolded"),
    (4, nn.Conv2d(3, 5, (1, 3), padding=(0, 1)), "per-sample"),  # 16 positions x 4 directions: no direct form
    (2, nn.Conv2d(3, 5, (3, 2), padding=1), "dense"),  # 6 taps read the 4 input positions
])
def test_direct_forms_equal_the_per_sample_gradients_products(side, conv, form):
    """Both forms of the direct products (the unfolded input without its padding-only rows, and the dense map at
    small inputs) equal the convolution's and the per-sample gradients' (float64); the prepared form takes the
    dense one exactly where it has fewer multiply-adds, and another input size falls back to the directions."""
    conv = conv.double()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, side, side, dtype=torch.float64, generator=g)
    delta = torch.randn_like(conv(a)).detach()
    alg = ConvAlgebra(conv)
    V = torch.randn(4, alg.size, dtype=torch.float64, generator=g)
    params = list(conv.parameters())
    expected = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
        conv(a[i : i + 1]), params, delta[i : i + 1])]) for i in range(6)]) @ V.T
    assert alg.fast
    assert ref.relative_error(alg.apply(a, [delta], V), expected) < 1e-12
    convolved = alg._convolved_products(a, delta, V[:, : conv.weight.numel()])
    for built in (DirectForm.of(conv, V, (side, side), dense=False), DirectForm.of(conv, V, (side, side), dense=True)):
        assert ref.relative_error(built.products(a, delta), convolved) < 1e-12
    unfolded = DirectForm.of(conv, V, (side, side), dense=False)
    if side == 1:
        assert int(unfolded.rows.sum()) == 3  # the centre tap of each input channel
    alg.in_shape = tuple(a.shape[1:])
    prepared = alg.prepare(V)
    kind = "per-sample" if not isinstance(prepared, DirectForm) else "dense" if prepared.dense else "unfolded"
    assert kind == form
    assert ref.relative_error(alg.apply(a, [delta], prepared), expected) < 1e-12
    bigger = torch.randn(6, 3, side + 1, side + 1, dtype=torch.float64, generator=g)
    delta_bigger = torch.randn_like(conv(bigger)).detach()
    assert ref.relative_error(alg.apply(bigger, [delta_bigger], prepared),
                              alg.apply(bigger, [delta_bigger], V)) < 1e-12


@pytest.mark.parametrize("side,conv,positions", [
    (2, nn.Conv2d(3, 4, 3, padding=1), True),  # a ResNet's third stage: 16 terms against 16 x 9 taps x in
    (1, nn.Conv2d(3, 4, 3, padding=1, bias=False), True),  # its fourth: the centre tap alone
    (2, nn.Conv2d(3, 4, 3, stride=2, padding=1), False),  # 2x2 -> 1x1: the unfolded input is smaller
    (2, nn.Conv2d(3, 4, (3, 2), padding=1), True),
    (4, nn.Conv2d(40, 3, 3, padding=1), True),  # 100 terms: the pattern as a matrix
])
def test_ghost_products_by_input_positions_equal_the_directions_products(side, conv, positions):
    """By input positions or by the unfolded input (as the probe's input size decides), the ghost product
    equals the per-sample gradients times directions made of the validation rows' gradients (float64)."""
    from hydraclean.ghost import ghost_products
    from hydraclean.layers import FEW_TERMS

    conv = conv.double()
    g = torch.Generator().manual_seed(0)
    alg = ConvAlgebra(conv)
    alg.in_shape = (conv.in_channels, side, side)
    a, rows = (torch.randn(n, conv.in_channels, side, side, dtype=torch.float64, generator=g) for n in (5, 7))
    delta, delta_rows = (torch.randn_like(conv(x)).detach() for x in (a, rows))
    mixing = torch.randn(3, 7, dtype=torch.float64, generator=g)
    V = mixing @ alg.gradients(rows, [delta_rows])
    factors = alg.ghost_factors(a, [delta])
    assert alg.by_positions() == positions == (factors.in_size is not None)
    if side == 4:
        assert alg.ghost_pattern((4, 4), (4, 4)).shape[0] > FEW_TERMS
    got = ghost_products(alg, factors, alg.ghost_factors(rows, [delta_rows]), mixing)
    assert ref.relative_error(got, alg.gradients(a, [delta]) @ V.T) < 1e-12
