"""Weight masks for unlearning: ``{parameter name: bool tensor}``, True where a weight may change.

Masks come from :mod:`patchlab.unlearning.attribution` (or anywhere else) and travel between processes as safetensors files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.io import atomic_write

Mask = dict[str, torch.Tensor]


def check_mask(model: PreTrainedModel, mask: Mask) -> None:
    """Raise unless ``mask`` maps parameter names of ``model`` to boolean tensors of the same shapes."""
    params = dict(model.named_parameters())
    if not isinstance(mask, dict) or not mask:
        raise PatchlabValueError("mask must be a non-empty dict {parameter name: bool tensor}")
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor):
            raise PatchlabValueError(f"mask for {name} must be a bool tensor, got {type(m).__name__}")
        if name not in params:
            raise PatchlabValueError(f"mask names a parameter the model does not have: {name!r}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise PatchlabValueError(f"mask for {name} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            raise PatchlabValueError(f"mask for {name} must be a bool tensor, got {m.dtype}")


def apply_mask(model: PreTrainedModel, mask: Mask | None) -> tuple[list[torch.nn.Parameter], list[Any]]:
    """Freeze parameters without a selected weight; zero the gradient of unselected weights of the others.

    Returns the trainable parameters and the gradient hooks' handles (to remove after training). An unselected
    weight gets a zero gradient at every step, so AdamW without weight decay (first and second moments stay 0,
    update ``lr * 0 / (0 + eps)``) leaves it exactly unchanged.
    """
    trainable, hooks = [], []
    for name, p in model.named_parameters():
        m = None if mask is None else mask.get(name)
        if mask is not None and (m is None or not m.any()):
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        if m is not None and not m.all():
            keep = m.to(p.device, p.dtype)
            hooks.append(p.register_hook(lambda grad, keep=keep: grad * keep))
        trainable.append(p)
    return trainable, hooks


def save_mask(mask: Mask, path: str | os.PathLike) -> Path:
    """Write ``mask`` (bool tensors keyed by parameter name) to a safetensors file, atomically."""
    if not isinstance(mask, dict) or not mask or any(m.dtype != torch.bool for m in mask.values()):
        raise PatchlabValueError("mask must be a non-empty dict {parameter name: bool tensor}")
    state = {name: m.detach().cpu().contiguous() for name, m in mask.items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "patchlab-mask"}))


def load_mask(path: str | os.PathLike) -> Mask:
    """Read a mask written by :func:`save_mask` (any safetensors file of bool tensors).

    Raises:
        PatchlabFileError: no such file. PatchlabValueError: not a safetensors file, or a tensor is not bool.
    """
    path = Path(path)
    if not path.is_file():
        raise PatchlabFileError(f"no such mask file: {path}")
    try:
        mask = load_file(path)
    except (SafetensorError, OSError) as err:
        raise PatchlabValueError(f"{path} is not a safetensors mask file: {err}") from err
    bad = [name for name, m in mask.items() if m.dtype != torch.bool]
    if bad:
        raise PatchlabValueError(f"{path}: mask tensors must be bool, not {mask[bad[0]].dtype} ({bad[0]})")
    return mask
