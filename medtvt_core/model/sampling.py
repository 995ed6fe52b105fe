"""Sampling that does not depend on the batch: every row draws from its own seeded generator."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from ..errors import DataError

__all__ = ["SeededRowSampler", "seed_of", "row_generators"]


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def row_generators(seed: int, record_ids: Sequence[Any], per_record: int, *salt: Any) -> list[torch.Generator]:
    """One generator per generated row: ``per_record`` consecutive rows per record."""
    return [torch.Generator().manual_seed(seed_of(seed, *salt, rid, g)) for rid in record_ids for g in range(per_record)]


class SeededRowSampler:
    """A transformers logits processor that samples each row's next token, at ``temperature`` and
    ``top_p`` (transformers' own warpers), from that row's own ``torch.Generator`` and leaves only it
    possible, so generate's multinomial draw (on the global RNG) picks it with probability 1.  Use it
    with ``do_sample=True, temperature=1, top_p=1`` (generate runs its own warpers before custom
    processors in some versions and after in others; here nothing else warps).

    Written here because transformers samples a whole batch from one RNG: a row's tokens would then
    depend on the rows sampled with it.  Each row's ``max_steps`` uniform numbers are drawn up front
    and moved to the device once; a step samples by inverse CDF (``searchsorted``), on the device,
    with no host round trip per token.
    """

    def __init__(self, generators: Sequence[torch.Generator], *, temperature: float = 1.0, top_p: float = 1.0,
                 max_steps: int = 1024):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.uniforms = torch.stack([torch.rand(max_steps, generator=g, dtype=torch.float64) for g in generators])
        self.step = 0
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
                       ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.step >= self.uniforms.size(1):
            raise DataError(f"SeededRowSampler: more than {self.uniforms.size(1)} steps; raise max_steps")
        if self.uniforms.device != scores.device:
            self.uniforms = self.uniforms.to(scores.device)
        warped = scores
        for w in self.warpers:
            warped = w(input_ids, warped)
        cdf = torch.softmax(warped.double(), dim=-1).cumsum(-1)
        u = self.uniforms[:, self.step:self.step + 1] * cdf[:, -1:]  # scaled: rounding never runs past the end
        self.step += 1
        picks = torch.searchsorted(cdf, u, right=True).clamp(max=scores.size(-1) - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, picks, 0.0)
