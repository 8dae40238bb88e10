"""Learning-rate schedules expanded per step."""

import numpy as np
import pytest

from hydraclean.schedules import ExponentialDecay, StepDecay, learning_rates


def test_constant_and_callables():
    np.testing.assert_array_equal(learning_rates(0.1, "constant", [3, 3]), np.full(6, 0.1))
    np.testing.assert_allclose(learning_rates(0.1, ExponentialDecay(0.5), [2, 2, 2]),
                               [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    np.testing.assert_allclose(learning_rates(1.0, StepDecay(step_size=2, gamma=0.1), [1, 1, 1, 1, 1]),
                               [1, 1, 0.1, 0.1, 0.01])
    np.testing.assert_allclose(learning_rates(2.0, lambda epoch, step: 1.0 / (1 + step), [3]), [2.0, 1.0, 2 / 3])


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="not a known schedule"):
        learning_rates(0.1, "cosine", [2])
    with pytest.raises(ValueError, match="negative or non-finite"):
        learning_rates(0.1, lambda e, s: -1.0, [2])
    with pytest.raises(ValueError, match="negative or non-finite"):
        learning_rates(0.1, lambda e, s: float("nan"), [2])
