"""What practitioners train: token ids, heads on frozen backbones in the modes they set, BatchNorm routes."""

import numpy as np
import pytest
import torch
from torch import nn

from hydraclean import HydraLabelCleaner
from hydraclean.modes import training_modes

from . import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:The trained model did not learn")


def topics(n=240, length=10, vocab=40, seed=0):
    """Token ids whose first four tokens name the topic (the label), 20% of the labels flipped."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 3, n)
    X = rng.randint(0, vocab, (n, length))
    X[:, :4] = y[:, None] * 10 + rng.randint(0, 10, (n, 4))
    flip = rng.rand(n) < 0.2
    noisy = y.copy()
    noisy[flip] = (y[flip] + 1) % 3
    return X, noisy, flip, y


class BagOfTokens(nn.Module):
    def __init__(self, vocab=40):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(vocab, 8), nn.Linear(8, 3)
        self.seen = set()

    def forward(self, ids):
        self.seen.add(ids.dtype)
        return self.head(self.bag(ids))


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_token_ids_reach_the_module_as_integers_and_are_scored(dtype):
    X, y, flip, clean = topics()
    X = X.astype(dtype)
    module = BagOfTokens()
    c = HydraLabelCleaner(module, max_epochs=8, batch_size=16, lr=0.5, random_state=0)
    c.fit(X[:180], y[:180], X_val=X[180:], y_val=clean[180:])
    assert c.module_.seen == {torch.int64 if dtype is np.int64 else torch.int32}
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(flip[:180], -c.label_quality_) > 0.8


def test_a_dataset_of_token_ids_gives_the_array_fit():
    X, y, _, clean = topics()
    kw = dict(max_epochs=3, batch_size=16, lr=0.5, random_state=0)
    arrays = HydraLabelCleaner(BagOfTokens, **kw).fit(X[:180], y[:180], X_val=X[180:], y_val=clean[180:])
    data = torch.utils.data.TensorDataset(torch.as_tensor(X[:180]), torch.as_tensor(y[:180]))
    dataset = HydraLabelCleaner(BagOfTokens, **kw).fit(data, X_val=X[180:], y_val=clean[180:])
    np.testing.assert_allclose(dataset.contribution_, arrays.contribution_, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shift,message", [(-1, "negative token id -1"), (40, "token id 79, but the module's "
                                                                            "embeddings have at most 40 rows")])
def test_ids_no_embedding_can_look_up_are_refused_naming_them(shift, message):
    X, y, _, clean = topics()
    est = HydraLabelCleaner(BagOfTokens, max_epochs=1)
    bad = X.copy()
    bad[3, 2] = X.max() + shift if shift > 0 else shift
    with pytest.raises(ValueError, match=message):
        est.fit(bad[:180], y[:180], X_val=X[180:], y_val=clean[180:])
    assert not hasattr(est, "contribution_")


def test_exact_mode_through_an_embedding_bag_is_refused_before_training():
    """torch has no second derivative of EmbeddingBag: the refusal names the layer and the fixes."""
    X, y, _, clean = topics()
    est = HydraLabelCleaner(BagOfTokens, hessian="exact", max_epochs=1)
    with pytest.raises(ValueError, match=r"no second derivative of nn.EmbeddingBag \(trainable: bag\).*nn.Embedding"):
        est.fit(X[:180], y[:180], X_val=X[180:], y_val=clean[180:])
    assert not hasattr(est, "contribution_")


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_directional_derivatives_through_an_embedding_bag_take_per_sample_gradients():
    """torch has no JVP of EmbeddingBag either: one direction goes through the per-sample gradients."""
    from hydraclean.gradients import PerSampleLoss, directional_derivatives, flatten, parameter_dict

    torch.manual_seed(0)
    X, y, _, _ = topics(n=6)
    module = BagOfTokens().double()
    x, t = torch.as_tensor(X), torch.as_tensor(y)
    params = parameter_dict(module)
    V = torch.randn(1, sum(p.numel() for p in params.values()), dtype=torch.float64)
    D = directional_derivatives(PerSampleLoss(module, nn.CrossEntropyLoss(reduction="none")), params, x, t, V)
    rows = []
    for i in range(len(t)):
        g = torch.autograd.grad(nn.functional.cross_entropy(module(x[i : i + 1]), t[i : i + 1]),
                                list(module.parameters()))
        rows.append(flatten(dict(zip(params, g))))
    np.testing.assert_allclose(D.numpy(), (torch.stack(rows) @ V.T).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_other_integer_inputs_are_cast_to_the_modules_dtype(dtype):
    """uint8 image bytes are values, not ids, and so are int64 features of a module without an embedding:
    they reach the module as floats."""
    rng = np.random.RandomState(0)
    X = rng.randint(0, 255, (60, 4)).astype(dtype)
    y = (X[:, 0] > 127).astype(int)
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(x.dtype)
            return super().forward(x)

    HydraLabelCleaner(Probe(4, 2), max_epochs=1, batch_size=16, lr=1e-4).fit(X[:40], y[:40], X_val=X[40:],
                                                                              y_val=y[40:])
    assert set(seen) == {torch.float32}


def frozen_backbone_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Dropout(0.1), nn.Linear(4 * 4 * 4, 3))
    model[0].eval()  # the usual frozen backbone: BatchNorm on its running statistics
    return model


def test_a_head_on_a_frozen_backbone_trains_as_a_fine_tuning_script_does():
    """The user's eval() on the backbone stays: the same run as `model.train(); backbone.eval()` with SGD."""
    rng = np.random.RandomState(0)
    X = rng.randn(64, 1, 6, 6).astype(np.float32)
    y = rng.randint(0, 3, 64)
    model = frozen_backbone_model()
    assert training_modes(model)["0.1"] is False and training_modes(model)["1"] is True
    c = HydraLabelCleaner(model, max_epochs=2, batch_size=16, lr=0.1, momentum=0.9, random_state=0)
    c.fit(X[:48], y[:48], X_val=X[48:], y_val=y[48:])
    # the practitioner's script, over the fit's own batches and dropout seeds
    mine = frozen_backbone_model()
    mine.train()
    mine[0].eval()
    optimizer = torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    traj = c.trajectory_
    Xt, yt = torch.as_tensor(X[:48]), torch.as_tensor(y[:48])
    for t, idx in enumerate(ref.batches(traj)):
        with ref.seeded(traj.seeds[t]):
            loss = nn.functional.cross_entropy(mine(Xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (name, a), b in zip(c.module_.state_dict().items(), mine.state_dict().values()):
        assert torch.equal(a, b), name  # backbone (its running statistics too) and head, bit for bit
    assert not model.training or model[0].training is False  # the user's module untouched


def test_a_frozen_backbones_route_keeps_only_the_head():
    from hydraclean.routes import plan_route
    from hydraclean.training import plan_trajectory

    model = frozen_backbone_model()
    X, y = torch.randn(32, 1, 6, 6), torch.arange(32) % 3
    route = plan_route(model, nn.CrossEntropyLoss(reduction="none"), X, y,
                       plan_trajectory(32, batch_size=8, max_epochs=1, seed=0))
    assert type(route).__name__ == "TrainingFactors" and route.kinds == ["factors"]
    assert route.nbytes <= 32 * (64 + 3) * 4 + 32 * 8


def bn_model():
    return ref.tiny_bn_cnn().float()


def test_batchnorm_routes_constant_and_exact_are_one_argument_apart():
    rng = np.random.RandomState(0)
    X = rng.randn(80, 1, 5, 5).astype(np.float32)
    y = rng.randint(0, 3, 80)
    kw = dict(max_epochs=2, batch_size=8, lr=0.05, random_state=0)
    constant = HydraLabelCleaner(bn_model, **kw).fit(X[:60], y[:60], X_val=X[60:], y_val=y[60:])
    exact = HydraLabelCleaner(bn_model, batchnorm="exact", **kw).fit(X[:60], y[:60], X_val=X[60:], y_val=y[60:])
    from scipy.stats import spearmanr

    # the same training run, scored two ways: close but not equal
    assert np.array_equal(constant.trajectory_loss_, exact.trajectory_loss_)
    assert not np.allclose(constant.contribution_, exact.contribution_, rtol=1e-4)
    assert spearmanr(constant.contribution_[:60], exact.contribution_[:60])[0] > 0.5
