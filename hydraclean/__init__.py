"""hydraclean: find mislabelled training data with HYDRA (hypergradient data relevance analysis).

The data's path through the package::

    data -> training (trajectory recorded) -> hypergradient -> contribution -> scoring -> cleaning -> estimator
"""

from .contribution import fit_contributions
from .estimator import HydraLabelCleaner, HydraSampler
from .schedules import ExponentialDecay, StepDecay

__all__ = ["ExponentialDecay", "HydraLabelCleaner", "HydraSampler", "StepDecay", "fit_contributions"]
__version__ = "0.1.0"
