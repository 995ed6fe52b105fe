"""GRPO (stage 3, RFT): TRL 1.16's math (:mod:`.math`), policies and the training loop."""

from .loop import *  # noqa: F401,F403
from .loop import __all__ as _loop_all
from .math import ADV_EPS, LOSS_TYPES  # noqa: F401

__all__ = list(_loop_all)
