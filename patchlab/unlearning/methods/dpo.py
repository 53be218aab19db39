"""DPO (Rafailov et al. 2023) with a refusal as the preferred answer ``w`` and the forget answer as the rejected
one ``l`` (Zhang et al. 2024's unlearning baseline):
``L = -mean log σ(β [(log p_θ(w) - log p_ref(w)) - (log p_θ(l) - log p_ref(l))])``.

Only the reference's sequence log-probabilities of the fixed forget answers and refusals enter, so by default they
are computed once before training and the reference model is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.errors import PatchlabValueError
from patchlab.unlearning.methods import Method, Needs, freeze_sequence, lr_sweep, require_positive

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """Settings of DPO.

    Attributes:
        beta: inverse temperature β (per nat of sequence log-probability ratio).
        refusals: preferred answers; forget example ``i`` is paired with ``refusals[i % len(refusals)]``.
    """

    beta: float = 0.1
    refusals: tuple[str, ...] = ("I don't know.",)

    def __post_init__(self) -> None:
        require_positive(self, "beta")
        if isinstance(self.refusals, str) or not self.refusals or not all(self.refusals):
            raise PatchlabValueError(f"DPO needs a non-empty list of non-empty refusal answers, got {self.refusals!r}")
        freeze_sequence(self, "refusals", str)


def loss(step: Step, s: Settings) -> torch.Tensor:
    """DPO's objective (module docstring); ``step.chosen`` holds the refusals."""
    import torch.nn.functional as F

    margin = step.log_ratio(step.chosen) - step.log_ratio(step.forget)
    return -step.seq_mean(F.logsigmoid(s.beta * margin))


#: Sweep: larger learning rates than the other methods, as DPO moves answers towards a refusal more slowly.
METHOD = Method(name="dpo", kind="finetune", settings=Settings,
                summary="DPO with a refusal preferred over the forget answer", loss=loss,
                needs=lambda s: Needs(reference="logprobs", refusals=s.refusals),
                sweep=lr_sweep(1.5e-3, 2e-3, 3e-3))
