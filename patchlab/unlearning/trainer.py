"""The fine-tuning loop that runs unlearning: one objective from :mod:`patchlab.unlearning.losses`, optionally
restricted to a weight mask, with a frozen copy of the starting model as reference."""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.unlearning.data import batches, collate, refusal_pairs, to_examples
from patchlab.unlearning.losses import METHODS
from patchlab.generation import DEFAULT_TEMPLATE
from patchlab.io import atomic_write_json
from patchlab.pair import ModelSpec, TokenizerSpec, load_model, load_tokenizer

Mask = dict[str, torch.Tensor]


@dataclass
class UnlearnRun:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (the input model, updated in place), in eval mode.
        losses: the objective's value at every optimizer step (mean over its micro-batches).
        settings: the run's hyper-parameters, as saved in ``unlearn_run.json``.
        out_dir: where the checkpoint was saved, if anywhere.
    """

    model: PreTrainedModel
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def check_mask(model: PreTrainedModel, mask: Mask) -> None:
    """Raise unless ``mask`` maps parameter names of ``model`` to boolean tensors of the same shapes."""
    params = dict(model.named_parameters())
    if not isinstance(mask, dict) or not mask:
        raise PatchlabValueError("mask must be a non-empty dict {parameter name: bool tensor}")
    for name, m in mask.items():
        if name not in params:
            raise PatchlabValueError(f"mask names a parameter the model does not have: {name!r}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise PatchlabValueError(f"mask for {name} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            raise PatchlabValueError(f"mask for {name} must be a bool tensor, got {m.dtype}")


def _apply_mask(model: PreTrainedModel, mask: Mask | None) -> tuple[list[torch.nn.Parameter], list[Any]]:
    """Freeze parameters without a selected weight; zero the gradient of unselected weights of the others.

    Returns the trainable parameters and the gradient hooks' handles (to remove after training). With zero
    gradients from the first step and no weight decay, Adam leaves unselected weights exactly unchanged.
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


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: dict, losses: list[float],
          out_dir: Path) -> None:
    """Write checkpoint + tokenizer + ``unlearn_run.json`` into a temp dir, then rename it onto ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "unlearn_run.json", {"settings": settings, "losses": losses})
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unlearn(model: ModelSpec, forget: Any, retain: Any = None, *, tokenizer: TokenizerSpec = None, method: str,
            lr: float = 1e-5, epochs: int = 1, batch_size: int = 8, grad_accum: int = 1, beta: float = 0.1,
            retain_weight: float = 1.0, kl_weight: float = 1.0, refusals: tuple[str, ...] = ("I don't know.",),
            mask: Mask | None = None, max_length: int = 256, template: str = DEFAULT_TEMPLATE, seed: int = 0,
            reference: PreTrainedModel | None = None, out_dir: str | os.PathLike | None = None,
            progress: bool = True) -> UnlearnRun:
    """Unlearn ``forget`` from ``model`` by fine-tuning with ``method``.

    Args:
        model: in-memory causal LM (updated in place; pass ``copy.deepcopy(model)`` to keep the original),
            local checkpoint directory or hub id.
        forget: texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path or a ``datasets.Dataset``.
        retain: same forms; required by ``graddiff`` and ``npo_kl``.
        tokenizer: defaults to the checkpoint's when ``model`` is a path.
        method: ``ga``, ``graddiff``, ``npo``, ``npo_kl`` or ``dpo`` (formulas in :mod:`patchlab.unlearning.losses`).
        lr: AdamW learning rate (no weight decay). epochs: passes over the forget set.
        batch_size: sequences per micro-batch (forget, and retain alongside); grad_accum: micro-batches per step.
        beta: β of NPO / DPO. retain_weight: GradDiff's retain weight. kl_weight: NPO+KL's KL weight.
        refusals: preferred answers for DPO, used in turn.
        mask: ``{parameter name: bool tensor}`` (e.g. from :func:`patchlab.attribution.mask`); only selected
            weights change, parameters without a selected weight are frozen.
        max_length: truncation, in tokens. template: QA prompt template. seed: shuffling and initialisation seed.
        reference: the frozen reference of NPO / NPO+KL / DPO; default: a deep copy of the starting model. It is
            put in eval mode with gradients off and never updated.
        out_dir: if given, the checkpoint (safetensors), tokenizer and ``unlearn_run.json`` (settings, loss curve)
            are written there atomically.

    Raises:
        PatchlabValueError: unknown method, empty forget set, missing retain set, bad mask, bad hyper-parameters.
    """
    if method not in METHODS:
        raise PatchlabValueError(f"unknown unlearning method {method!r}; choose from {', '.join(METHODS)}")
    objective, needs_retain, needs_ref = METHODS[method]
    for name, value, low in (("lr", lr, 0.0), ("beta", beta, 0.0)):
        if not value > low:
            raise PatchlabValueError(f"{name} must be > {low}, got {value}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise PatchlabValueError(f"{name} must be a positive integer, got {value!r}")
    if needs_retain and retain is None:
        raise PatchlabValueError(f"method {method!r} needs a retain set (retain=...)")
    tok = load_tokenizer(tokenizer if tokenizer is not None else model)
    model = load_model(model)
    if mask is not None:
        check_mask(model, mask)
    forget_ex = to_examples(forget, tok, max_length=max_length, template=template, what="forget")
    retain_ex = to_examples(retain, tok, max_length=max_length, template=template, what="retain") if needs_retain else []
    torch.manual_seed(seed)

    ref = None
    if needs_ref:
        ref = (copy.deepcopy(model) if reference is None else reference).eval()
        ref.requires_grad_(False)
    trainable, hooks = _apply_mask(model, mask)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    model, optimizer = accelerator.prepare(model, optimizer)
    if ref is not None:
        ref.to(accelerator.device)

    pairs = refusal_pairs(forget_ex, tok, refusals) if method == "dpo" else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = {"method": method, "lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum,
                "beta": beta, "retain_weight": retain_weight, "kl_weight": kl_weight, "refusals": list(refusals),
                "masked": mask is not None, "max_length": max_length, "template": template, "seed": seed,
                "n_forget": len(forget_ex), "n_retain": len(retain_ex)}
    losses: list[float] = []
    micro_losses: list[float] = []
    n_batches = -(-len(forget_ex) // batch_size)
    model.train()
    bar = tqdm(total=epochs * n_batches, desc=f"unlearn ({method})", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(forget_ex), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        retain_iter = itertools.cycle(list(batches(retain_ex, batch_size, pad_id=pad, shuffle=True,
                                                   seed=seed + 10_000 + epoch))) if retain_ex else None
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            extra = {}
            if pairs is not None:
                forget_batch = collate([pairs[i][1] for i in idx], pad)
                extra["chosen"] = collate([pairs[i][0] for i in idx], pad)
            else:
                forget_batch = collate([forget_ex[i] for i in idx], pad)
            loss = objective(model, ref, forget_batch, next(retain_iter) if retain_iter else None, beta=beta,
                             retain_weight=retain_weight, kl_weight=kl_weight, **extra)
            if not torch.isfinite(loss):
                raise PatchlabValueError(f"the {method} loss became {loss.item()} at epoch {epoch}, batch {b}; "
                                         "lower the learning rate")
            accelerator.backward(loss / grad_accum)
            micro_losses.append(loss.item())
            if len(micro_losses) == grad_accum or b == n_batches - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(sum(micro_losses) / len(micro_losses))
                micro_losses = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model = accelerator.unwrap_model(model).eval()
    for hook in hooks:
        hook.remove()
    model.requires_grad_(True)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _save(model, tok, settings, losses, out)
    return UnlearnRun(model=model, losses=losses, settings=settings, out_dir=out)
