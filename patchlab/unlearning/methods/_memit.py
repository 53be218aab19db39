"""Settings shared by the MEMIT-style editing baselines (:mod:`patchlab.unlearning.editing`); their defaults are
read from :func:`patchlab.unlearning.editing.memit`'s signature, so the two never disagree."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.unlearning import editing
from patchlab.unlearning.methods import freeze_sequence, require_positive


def defaults(function: Callable) -> dict[str, Any]:
    """The default of every keyword parameter of ``function``."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


_MEMIT = defaults(editing.memit)


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

    layers: tuple[int, ...] | None = _MEMIT["layers"]
    cov_weight: float = _MEMIT["cov_weight"]
    steps: int = _MEMIT["steps"]
    lr: float = _MEMIT["lr"]
    clamp_norm: float = _MEMIT["clamp_norm"]
    weight_decay: float = _MEMIT["weight_decay"]

    def __post_init__(self) -> None:
        require_positive(self, "cov_weight", "steps", "lr", "clamp_norm")
        freeze_sequence(self, "layers", int, optional=True)


def applier(edit: Callable[..., editing.EditRun]) -> Callable[..., PreTrainedModel]:
    """The registry's ``apply`` for an editing function of :mod:`patchlab.unlearning.editing`."""

    def apply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[editing.EditRequest],
              settings: MemitSettings, *, cov_texts: Sequence[str], template: str, progress: bool = False
              ) -> PreTrainedModel:
        return edit(model, tokenizer, requests, cov_texts=cov_texts, template=template, progress=progress,
                    **dataclasses.asdict(settings)).model

    return apply


#: Sweep of both baselines: the covariance weight, gentlest first (MEMIT uses 1.5e4 on GPT-J).
SWEEP = tuple({"cov_weight": w} for w in (1e4, 1e3, 1.0))
