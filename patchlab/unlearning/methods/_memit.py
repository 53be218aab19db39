"""Settings shared by the MEMIT-style editing baselines (:mod:`patchlab.unlearning.editing`); their defaults are
:data:`patchlab.defaults.MEMIT_DEFAULTS`, which :func:`patchlab.unlearning.editing.memit`'s signature takes too, so
the two never disagree. Torch-free: the edits themselves load with :mod:`patchlab.unlearning.editing` on first use."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.defaults import MEMIT_DEFAULTS
from patchlab.unlearning.methods import freeze_sequence, require_positive

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from patchlab.unlearning.editing import EditRequest


@dataclass(frozen=True)
class MemitSettings:
    """Settings of a MEMIT-style edit (:func:`patchlab.unlearning.editing.memit`).

    Attributes:
        layers: edited decoder layers; ``None`` = :func:`patchlab.unlearning.editing.default_layers`.
        cov_weight: weight of the key covariance ``C`` against the edit keys (dimensionless; MEMIT's
            ``mom2_update_weight``); larger = gentler edit.
        steps: Adam steps optimising each target ``delta``.
        lr: Adam learning rate of ``delta``.
        clamp_norm: largest ``||delta||`` as a multiple of ``||h||`` (dimensionless).
        weight_decay: weight of MEMIT's ``||delta|| / ||h||^2`` penalty (added to the objective, in its units).
    """

    layers: tuple[int, ...] | None = MEMIT_DEFAULTS["layers"]
    cov_weight: float = MEMIT_DEFAULTS["cov_weight"]
    steps: int = MEMIT_DEFAULTS["steps"]
    lr: float = MEMIT_DEFAULTS["lr"]
    clamp_norm: float = MEMIT_DEFAULTS["clamp_norm"]
    weight_decay: float = MEMIT_DEFAULTS["weight_decay"]

    def __post_init__(self) -> None:
        require_positive(self, "cov_weight", "steps", "lr", "clamp_norm")
        freeze_sequence(self, "layers", int, optional=True)


def applier(edit: str) -> Callable[..., PreTrainedModel]:
    """The registry's ``apply`` for the editing function named ``edit`` of :mod:`patchlab.unlearning.editing`
    (imported, with torch, when the edit runs)."""

    def apply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
              settings: MemitSettings, *, cov_texts: Sequence[str], template: str, progress: bool = False
              ) -> PreTrainedModel:
        from patchlab.unlearning import editing

        return getattr(editing, edit)(model, tokenizer, requests, cov_texts=cov_texts, template=template,
                                      progress=progress, **dataclasses.asdict(settings)).model

    return apply


#: Sweep of both baselines: the covariance weight, gentlest first (MEMIT uses 1.5e4 on GPT-J).
SWEEP = tuple({"cov_weight": w} for w in (1e4, 1e3, 1.0))
