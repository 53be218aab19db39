"""Gradient difference (GradDiff): ``L = -NLL(f) + retain_weight * NLL(r)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.unlearning.methods import Method, Needs, lr_sweep, require_non_negative

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """Settings of GradDiff.

    Attributes:
        retain_weight: weight of the retain NLL against the forget NLL (dimensionless; both in nats per token).
    """

    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        require_non_negative(self, "retain_weight")


def loss(step: Step, s: Settings) -> torch.Tensor:
    """``-NLL(f) + retain_weight * NLL(r)``."""
    return -step.nll(step.forget) + s.retain_weight * step.nll(step.retain)


METHOD = Method(name="graddiff", kind="finetune", settings=Settings,
                summary="−NLL(forget) + retain_weight·NLL(retain)", loss=loss, needs=Needs(retain=True),
                sweep=lr_sweep(7e-4, 1e-3, 2e-3))
