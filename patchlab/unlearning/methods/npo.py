"""Negative preference optimisation (NPO, Zhang et al. 2024):
``L = -(2/β) mean log σ(-β (log p_θ(f) - log p_ref(f)))`` on sequence log-probabilities, frozen reference.

Only the reference's sequence log-probabilities of the (fixed) forget set enter, so by default they are computed
once before training and the reference model is dropped (``reference="precompute"`` of
:func:`patchlab.unlearning.unlearn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.unlearning.methods import Method, Needs, lr_sweep, require_positive

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """Settings of NPO.

    Attributes:
        beta: inverse temperature β (per nat of sequence log-probability ratio).
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        require_positive(self, "beta")


def forget_term(step: Step, beta: float) -> torch.Tensor:
    """``-(2/β) mean log σ(-β (log p_θ(f) - log p_ref(f)))`` over the forget batch."""
    import torch.nn.functional as F

    return -(2.0 / beta) * step.seq_mean(F.logsigmoid(-beta * step.log_ratio(step.forget)))


def loss(step: Step, s: Settings) -> torch.Tensor:
    """NPO's objective (module docstring)."""
    return forget_term(step, s.beta)


METHOD = Method(name="npo", kind="finetune", settings=Settings,
                summary="−(2/β)·mean log σ(−β·(log p_θ(f) − log p_ref(f))), frozen reference", loss=loss,
                needs=Needs(reference="logprobs"), sweep=lr_sweep(7e-4, 1e-3, 2e-3))
