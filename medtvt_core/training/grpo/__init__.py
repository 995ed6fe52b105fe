"""GRPO (stage 3, RFT): TRL 1.16's math (:mod:`.math`) and a ``transformers.Trainer`` (:mod:`.trainer`)."""

from .math import (ADV_EPS, LOSS_TYPES, compute_rewards, group_advantages, grpo_loss,
                   nanstd, selective_log_softmax, weighted_rewards)
from .trainer import MedTVTGRPOTrainer, PromptWindowSampler, check_rft_layout, frozen_reference, run_grpo

__all__ = ["ADV_EPS", "LOSS_TYPES", "MedTVTGRPOTrainer", "PromptWindowSampler", "check_rft_layout",
           "compute_rewards", "frozen_reference", "group_advantages",
           "grpo_loss", "nanstd", "run_grpo", "selective_log_softmax", "weighted_rewards"]
