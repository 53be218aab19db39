"""The recipe of an unlearning run besides the method's own settings: :class:`TrainingSettings` (optimiser, data and
schedule) and :class:`ReferenceSettings` (how the frozen starting model reaches the objectives), both frozen
dataclasses validated on construction, and the command-line flags built from :class:`TrainingSettings`.

Torch-free (a reference device is checked, with torch, only when one is given), so a script's parser can list these
flags before torch loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from patchlab.defaults import DEFAULT_TEMPLATE
from patchlab.errors import PatchlabValueError
from patchlab.unlearning.methods import add_field_flag, field_docs, given_flags, require_positive

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: How the frozen reference reaches the objectives: ``"precompute"`` its sequence log-probabilities before training
#: (the reference model is then only kept by methods that need it during training), or ``"held"`` in memory.
REFERENCE_MODES = ("precompute", "held")


def _require_int(settings: Any, name: str, *, positive: bool) -> None:
    """Raise :class:`PatchlabValueError` unless field ``name`` of ``settings`` is an integer (``>= 1`` if
    ``positive``)."""
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value < 1):
        raise PatchlabValueError(f"{name} must be {'a positive' if positive else 'an'} integer, got {value!r}")


@dataclass(frozen=True)
class TrainingSettings:
    """The training recipe of :func:`patchlab.unlearning.unlearn`, whatever the method.

    Attributes:
        lr: AdamW learning rate (no weight decay).
        epochs: passes over the forget set.
        batch_size: forget sequences per micro-batch (and as many retain sequences alongside), split across
            processes when there are several.
        grad_accum: micro-batches per optimizer step.
        gradient_checkpointing: recompute activations in the backward pass (transformers' non-reentrant
            checkpointing): less activation memory for about one more forward pass per step.
        max_grad_norm: clip the global gradient norm (L2 over every trainable parameter) to this before each
            optimizer step; ``None``: no clipping.
        mask_after_clipping: with a weight mask, keep every parameter trainable so its whole gradient enters the
            clipping norm, and multiply the gradients by the mask after clipping, right before the step, as the
            WAGLE authors' trainer does (``mask_gradient`` after ``clip_grad_norm_``); default: unselected weights
            are frozen and their gradient zeroed as it is computed. Without clipping the two agree exactly.
        max_length: truncation of every example, in tokens (at least 2, checked as the examples are encoded).
        template: the QA prompt template, a text holding ``{question}``.
        seed: seed of the shuffling (epoch ``e`` shuffles with ``seed + e``) and of a method's setup (e.g. RMU's
            random direction).
    """

    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = None
    mask_after_clipping: bool = False
    max_length: int = 256
    template: str = DEFAULT_TEMPLATE
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive(self, "lr")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            _require_int(self, name, positive=True)
        _require_int(self, "seed", positive=False)
        if not isinstance(self.template, str):
            raise PatchlabValueError(f"template must be a text holding {{question}}, got {self.template!r}")
        if self.max_grad_norm is not None:
            require_positive(self, "max_grad_norm")
        for name in ("mask_after_clipping", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise PatchlabValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


#: The names :class:`TrainingSettings` takes, which :func:`patchlab.unlearning.unlearn` also takes as flat keywords.
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingSettings))


def training_settings(base: TrainingSettings | None, flat: Mapping[str, Any]) -> TrainingSettings:
    """``base`` (default :class:`TrainingSettings`\\ ``()``) with the fields given in ``flat`` replaced, validated.

    Raises:
        PatchlabValueError: ``base`` is not a :class:`TrainingSettings`, ``flat`` names no field of it, or a value
            is invalid.
    """
    if base is not None and not isinstance(base, TrainingSettings):
        raise PatchlabValueError(f"training must be a TrainingSettings, got {type(base).__name__}")
    unknown = sorted(set(flat) - set(TRAINING_FIELDS))
    if unknown:
        raise PatchlabValueError(f"no training setting {', '.join(map(repr, unknown))}; valid: "
                                 f"{', '.join(TRAINING_FIELDS)}")
    return dataclasses.replace(base or TrainingSettings(), **flat)


@dataclass(frozen=True)
class ReferenceSettings:
    """How the methods that need the frozen starting model get it (NPO, DPO, NPO+KL, RMU; the others ignore it).

    Attributes:
        mode: ``"precompute"`` (default): NPO, DPO and the NPO term of NPO+KL only use its sequence
            log-probabilities of the fixed forget set (and DPO's refusals), so they are computed before training on
            the very batches training will see (one no-grad forward per batch and epoch, the same numbers as a held
            reference, bit for bit) and the model is not kept. ``"held"``: a frozen copy is kept in memory and run
            at every step. NPO+KL (logits on retain batches) and RMU (activations on retain batches) always hold it.
        model: the frozen reference; default: a deep copy of the starting model (made only when it must be held),
            or the starting model itself before its first update when everything is precomputed. Put in eval mode
            with gradients off and moved to ``device``; never updated.
        device: where a held reference lives, default the training device. A full-size copy there costs the weights
            once more (13.5 GB for a 7B model in bfloat16); on ``"cpu"`` it costs host memory instead and every step
            waits for a CPU forward pass of the retain batch (minutes per step at 7B).
    """

    mode: str = "precompute"
    model: PreTrainedModel | None = field(default=None, repr=False)
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.mode not in REFERENCE_MODES:
            raise PatchlabValueError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {self.mode!r} "
                                     "(pass a reference model as ReferenceSettings(model=...))")
        if self.device is not None:
            from patchlab.pair.placement import check_device

            check_device(self.device)


def add_training_args(parser: argparse.ArgumentParser, title: str, *, exclude: tuple[str, ...] = ()
                      ) -> argparse.ArgumentParser:
    """Add one ``--name`` flag per :class:`TrainingSettings` field but ``exclude``, in an argument group ``title``;
    default ``None`` (unset: the recipe's own default), help from the class docstring with the field's default.
    Read them back with :func:`training_from_args`.

    Raises:
        PatchlabValueError: a field's flag is taken by another option.
    """
    group = parser.add_argument_group(title)
    docs, hints = field_docs(TrainingSettings), typing.get_type_hints(TrainingSettings)
    names = tuple(name for name in TRAINING_FIELDS if name not in exclude)
    defaults = TrainingSettings()
    for name in names:
        add_field_flag(group, name, hints[name], f"{docs[name]} [default: {getattr(defaults, name)}]")
    parser.set_defaults(_training_settings=names)
    return parser


def training_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags (:func:`add_training_args`) given on the command line: ``{field: value}``."""
    return given_flags(args, getattr(args, "_training_settings", ()))


__all__ = ["REFERENCE_MODES", "TRAINING_FIELDS", "ReferenceSettings", "TrainingSettings", "add_training_args",
           "training_from_args", "training_settings"]
