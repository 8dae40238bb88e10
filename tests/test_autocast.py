"""Mixed precision (autocast): every scoring route sees the same low-precision training run."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from hydraclean import HydraLabelCleaner
from hydraclean.training import plan_trajectory, run_training

from . import reference as ref


# digits' labels mod 3 on a 6 x 6 crop: the model learns little, only the arithmetic matters here
pytestmark = pytest.mark.filterwarnings("ignore:The trained model did not learn")


def digits():
    X, y = load_digits(return_X_y=True)
    X = (X[:300] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)[:, :, 1:7, 1:7]  # tiny_conv_net's 6 x 6 input
    return X, y[:300] % 3


def cleaner(**kw):
    return HydraLabelCleaner(lambda: ref.tiny_conv_net().float(), max_epochs=2, batch_size=16, lr=0.05,
                             random_state=0, strategy="cluster", n_val_features=20, **kw)


def fit(**kw):
    X, y = digits()
    return cleaner(**kw).fit(X, y, validation_mask=np.arange(len(y)) >= 240)


def test_training_steps_run_under_autocast_with_float32_state():
    module = ref.tiny_conv_net().float()
    X, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 3
    seen = []
    module[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    traj = plan_trajectory(8, batch_size=4, max_epochs=1, lr=0.1, lr_schedule="constant", momentum=0.9,
                           weight_decay=0.0, seed=0, autocast=torch.bfloat16)
    _, _, trace = run_training(module, X, y, torch.nn.CrossEntropyLoss(reduction="none"), traj)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert trace.loss.dtype == trace.proba.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_route_gives_the_same_contributions_under_autocast(dtype, tmp_path):
    """Layer factors from training, every step's gradient, checkpoints and disk: float32 agreement."""
    base = fit(autocast=dtype)
    row = sum(p.numel() for p in base.module_.parameters()) * 4
    plain = fit()
    scale = np.nanmax(np.abs(base.class_contribution_))
    # autocast is in effect: another run than float32's, but the same picture
    assert np.nanmax(np.abs(plain.contribution_ - base.contribution_)) > 1e-5 * scale
    assert np.corrcoef(plain.label_quality_[:240], base.label_quality_[:240])[0, 1] > 0.9
    n_steps = 2 * 240 // 16
    # every step's gradient and the start (w_0, v_0); checkpoints; on disk with the start in memory
    for kw in (dict(max_memory=(n_steps + 2) * row, spill_dir=None), dict(max_memory=3 * row, spill_dir=None),
               dict(max_memory=2 * row, spill_dir=str(tmp_path))):
        other = fit(autocast=dtype, **kw)
        for name in ("contribution_", "class_contribution_", "contribution_matrix_"):
            np.testing.assert_allclose(getattr(other, name), getattr(base, name), rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} with {kw}")


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(hessian="exact"), "hessian='free' only"),
        (dict(module=lambda: ref.tiny_conv_net()), "needs a float32 module"),
        (dict(autocast="int8"), "autocast"),
    ],
)
def test_autocast_errors_name_the_fix(kw, message):
    X, y = digits()
    params = dict(module=lambda: ref.tiny_conv_net().float(), autocast="bfloat16", max_epochs=1, random_state=0)
    est = HydraLabelCleaner(**{**params, **kw})
    with pytest.raises(ValueError, match=message):
        est.fit(X if "module" not in kw else X.astype(np.float64), y, validation_mask=np.arange(len(y)) >= 240)
    assert not hasattr(est, "contribution_")
