"""Gradient ascent (GA): ``L = -NLL(f)``, the forget set's likelihood pushed down with no counterweight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.unlearning.methods import Method, lr_sweep

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """GA has no settings of its own."""


def loss(step: Step, s: Settings) -> torch.Tensor:
    """``-NLL(f)`` (nats per target token)."""
    return -step.nll(step.forget)


#: Sweep: 2 epochs of batch 8 at three learning rates spanning partial to complete removal of the toy target
#: answers (target BLEU about 40-60, 3-13 and 0).
METHOD = Method(name="ga", kind="finetune", settings=Settings, summary="−NLL(forget)", loss=loss,
                sweep=lr_sweep(7e-4, 1e-3, 2e-3))
