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


def apply_mask(model: PreTrainedModel, mask: Mask | None, *, after_clipping: bool = False
               ) -> tuple[list[torch.nn.Parameter], list[Any]]:
    """Restrict training to the weights ``mask`` selects; returns the trainable parameters and hook handles (to
    remove after training).

    * ``after_clipping=False`` (default): parameters without a selected weight are frozen, and a gradient hook
      zeroes the gradient of the unselected weights of the others as it is computed.
    * ``after_clipping=True`` (the WAGLE authors' trainer, ``mask_gradient`` after ``clip_grad_norm_``): every
      parameter stays trainable, so its whole gradient counts in a clipping norm, and the mask multiplies the
      gradients later, right before ``optimizer.step()`` (after any clipping), through the hook that
      :func:`mask_before_step` registers. No hook is returned.

    Either way an unselected weight gets a zero gradient at every step, so AdamW without weight decay (first and
    second moments stay 0, update ``lr * 0 / (0 + eps)``) leaves it exactly unchanged; with weight decay (the
    authors' TOFU configs use 0.1) ``after_clipping=True`` still decays it, as their code does.
    """
    if after_clipping:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        return params, []
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


#: The work of :func:`mask_gradients`, prepared once by :func:`gradient_masks`: ``(parameter, its mask)`` pairs,
#: the mask a bool tensor of the parameter's shape on its device, or ``None`` to zero the whole gradient.
GradientMasks = list[tuple[torch.nn.Parameter, torch.Tensor | None]]


def gradient_masks(model: PreTrainedModel, mask: Mask) -> GradientMasks:
    """Each parameter of ``model`` whose gradient ``mask`` changes, with its mask moved once to the parameter's
    device (``None`` for a parameter the mask omits: it selects nothing); all-True masks are left out.

    Build it once the parameters sit on their training device (the masks do not follow a later move)."""
    out: GradientMasks = []
    for name, p in model.named_parameters():
        m = mask.get(name)
        if m is None:
            out.append((p, None))
        elif not m.all():
            out.append((p, m.to(p.device)))
    return out


@torch.no_grad()
def mask_gradients(masks: GradientMasks) -> None:
    """Multiply each listed parameter's ``.grad`` by its mask in place (the bool mask promotes to the gradient's
    dtype: the same bits as multiplying by the mask cast to it), or zero it where the mask is ``None``; parameters
    without a gradient are skipped."""
    for p, m in masks:
        if p.grad is None:
            continue
        if m is None:
            p.grad.zero_()
        else:
            p.grad.mul_(m)


def mask_before_step(optimizer: torch.optim.Optimizer, model: PreTrainedModel, mask: Mask) -> Any:
    """Register :func:`mask_gradients` of ``model``'s :func:`gradient_masks` (built now, so call this once the
    model sits on its training device) to run right before every ``optimizer.step()``, that is after any gradient
    clipping done between the backward pass and the step (``apply_mask(..., after_clipping=True)``); returns the
    handle (``.remove()`` it after training)."""
    masks = gradient_masks(model, mask)
    return optimizer.register_step_pre_hook(lambda *_: mask_gradients(masks))


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
