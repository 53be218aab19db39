"""The fine-tuning loop that runs unlearning: one objective from :mod:`patchlab.unlearning.losses`, optionally
restricted to a weight mask, with a frozen copy of the starting model as reference."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE
from patchlab.io import OutputDir, atomic_write_json, output_dir
from patchlab.pair import ModelSpec, TokenizerSpec, load_model, load_tokenizer
from patchlab.unlearning.data import Example, collate, padding_id, refusal_pairs, to_examples
from patchlab.unlearning.losses import METHODS, Batch, LossFn
from patchlab.unlearning.masks import Mask, apply_mask, check_mask

#: One epoch's data: its forget batches with the objective's extra arguments, and its retain batch stream.
EpochData = tuple[list[tuple[Batch, dict[str, Batch]]], Iterator[Batch | None]]


@dataclass
class UnlearnRun:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (the input model, updated in place), in eval mode.
        losses: the loss curve: the objective at every optimizer step (mean over its micro-batches and processes).
        settings: the run's hyper-parameters, as saved in ``unlearn_run.json``.
        out_dir: where the checkpoint was saved, if anywhere.
    """

    model: PreTrainedModel
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: dict, losses: list[float],
          out_dir: OutputDir, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write checkpoint + tokenizer + ``unlearn_run.json`` into the claimed ``out_dir`` (:meth:`OutputDir.write_tree`).

    ``state_dict``: the full weights when they are sharded across processes (FSDP); default the model's own.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "unlearn_run.json", {"settings": settings, "losses": losses})

    out_dir.write_tree(write)


def _check_settings(method: str, retain: Any, refusals: Sequence[str], *, lr: float, beta: float, epochs: int,
                    batch_size: int, grad_accum: int) -> None:
    """Raise a :class:`PatchlabValueError` naming the first bad argument of :func:`unlearn`."""
    if method not in METHODS:
        raise PatchlabValueError(f"unknown unlearning method {method!r}; choose from {', '.join(METHODS)}")
    for name, value in (("lr", lr), ("beta", beta)):
        if not value > 0:
            raise PatchlabValueError(f"{name} must be > 0, got {value}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise PatchlabValueError(f"{name} must be a positive integer, got {value!r}")
    if METHODS[method][1] and retain is None:
        raise PatchlabValueError(f"method {method!r} needs a retain set (retain=...)")
    if method == "dpo" and (isinstance(refusals, str) or not refusals or not all(refusals)):
        raise PatchlabValueError(f"DPO needs a non-empty list of non-empty refusal answers, got {refusals!r}")


def _frozen_reference(model: PreTrainedModel, reference: PreTrainedModel | None) -> PreTrainedModel:
    """The reference of NPO / NPO+KL / DPO: ``reference`` or a deep copy of ``model``; eval mode, no gradients."""
    ref = (copy.deepcopy(model) if reference is None else reference).eval()
    return ref.requires_grad_(False)


def _process_share(idx: list[int], accelerator: Accelerator) -> list[int]:
    """This process's part of a global batch of example indices (all of it with one process).

    A batch smaller than the number of processes is repeated so that every process gets at least one example.
    """
    n = accelerator.num_processes
    if n == 1:
        return idx
    idx = (idx * n)[:max(len(idx), n)]
    return idx[accelerator.process_index::n]


def _forget_batches(examples: list[Example], pairs: list[tuple[Example, Example]] | None, batch_size: int, pad: int,
                    seed: int, accelerator: Accelerator) -> list[tuple[Batch, dict[str, Batch]]]:
    """One epoch of (forget batch, extra loss arguments), shuffled with ``seed``; DPO adds ``chosen`` refusals."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for start in range(0, len(order), batch_size):
        idx = _process_share(order[start:start + batch_size], accelerator)
        if pairs is None:
            out.append((collate([examples[i] for i in idx], pad), {}))
        else:
            out.append((collate([pairs[i][1] for i in idx], pad), {"chosen": collate([pairs[i][0] for i in idx], pad)}))
    return out


def _retain_stream(examples: list[Example], batch_size: int, pad: int, seed: int,
                   accelerator: Accelerator) -> Iterator[Batch | None]:
    """Endless retain batches (shuffled with ``seed``, cycled), or ``None`` forever when there is no retain set."""
    if not examples:
        return itertools.repeat(None)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    shares = [_process_share(order[i:i + batch_size], accelerator) for i in range(0, len(order), batch_size)]
    return itertools.cycle([collate([examples[i] for i in idx], pad) for idx in shares])


def _train(model: PreTrainedModel, ref: PreTrainedModel | None, objective: LossFn, optimizer: torch.optim.Optimizer,
           accelerator: Accelerator, epoch_data: Callable[[int], EpochData], *, epochs: int, n_batches: int,
           grad_accum: int, hparams: dict[str, float], desc: str, progress: bool) -> list[float]:
    """Run the optimisation; returns the objective at each optimizer step (mean over its micro-batches and
    processes). ``epoch_data(e)`` builds epoch ``e``'s ``n_batches`` forget batches and its retain stream."""
    losses: list[float] = []
    model.train()
    bar = tqdm(total=epochs * n_batches, desc=desc, disable=not progress)
    for epoch in range(epochs):
        forget, retain = epoch_data(epoch)
        for b, (forget_batch, extra) in enumerate(forget):
            group_start = b - b % grad_accum
            group = min(grad_accum, len(forget) - group_start)
            last = b == group_start + group - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = objective(model, ref, forget_batch, next(retain), **hparams, **extra)
                if not torch.isfinite(loss):
                    raise PatchlabValueError(f"the {desc} loss became {loss.item()} at epoch {epoch}, batch {b}; "
                                             "lower the learning rate")
                accelerator.backward(loss / group)
            if b == group_start:
                step_loss = 0.0
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / group
            if last:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return losses


def unlearn(model: ModelSpec, forget: Any, retain: Any = None, *, tokenizer: TokenizerSpec = None, method: str,
            lr: float = 1e-5, epochs: int = 1, batch_size: int = 8, grad_accum: int = 1, beta: float = 0.1,
            retain_weight: float = 1.0, kl_weight: float = 1.0, refusals: Sequence[str] = ("I don't know.",),
            mask: Mask | None = None, max_length: int = 256, template: str = DEFAULT_TEMPLATE, seed: int = 0,
            reference: PreTrainedModel | None = None, out_dir: str | os.PathLike | OutputDir | None = None,
            overwrite: bool = False,
            progress: bool = True) -> UnlearnRun:
    """Unlearn ``forget`` from ``model`` by fine-tuning with ``method``; returns an :class:`UnlearnRun`
    (``.model``, ``.losses`` the loss curve, ``.settings``, ``.out_dir``).

    Args:
        model: in-memory causal LM (updated in place; pass ``copy.deepcopy(model)`` to keep the original),
            local checkpoint directory or hub id. It trains on its own device (move it to ``cuda`` first); under
            ``accelerate launch`` with several processes Accelerate places and wraps it (DDP / FSDP).
        forget: texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path or a ``datasets.Dataset``.
        retain: same forms; required by ``graddiff`` and ``npo_kl``, ignored by the other methods.
        tokenizer: defaults to the checkpoint's when ``model`` is a path.
        method: ``ga``, ``graddiff``, ``npo``, ``npo_kl`` or ``dpo`` (formulas in :mod:`patchlab.unlearning.losses`).
        lr: AdamW learning rate (no weight decay). epochs: passes over the forget set.
        batch_size: forget sequences per micro-batch (and as many retain sequences alongside), split across
            processes when there are several; grad_accum: micro-batches per optimizer step.
        beta: β of NPO / DPO. retain_weight: GradDiff's retain weight. kl_weight: NPO+KL's KL weight.
        refusals: preferred answers for DPO, used in turn.
        mask: ``{parameter name: bool tensor}`` (e.g. from :mod:`patchlab.unlearning.attribution`); only selected weights
            change, parameters without a selected weight are frozen.
        max_length: truncation, in tokens. template: QA prompt template. seed: shuffling and initialisation seed.
        reference: the frozen reference of NPO / NPO+KL / DPO; default: a deep copy of the starting model. It is
            put in eval mode with gradients off and never updated.
        out_dir: if given, the checkpoint (safetensors), tokenizer and ``unlearn_run.json`` (settings, loss curve)
            are written there (by the main process; see :class:`patchlab.io.OutputDir`). It is checked before
            training: a directory holding anything patchlab did not write is refused, an earlier checkpoint is
            replaced only with ``overwrite=True``, and files you added beside it are never removed.
        progress: show a tqdm bar with the current loss.

    Raises:
        PatchlabValueError: unknown method, empty forget set, missing retain set, bad mask, bad hyper-parameters,
            or a loss that became NaN/infinite.
        PatchlabFileError: ``out_dir`` is not a usable output directory (checked before training, see
            :class:`patchlab.io.OutputDir`): a file, unwritable, holding files patchlab did not write, or an earlier
            checkpoint without ``overwrite=True``.
    """
    _check_settings(method, retain, refusals, lr=lr, beta=beta, epochs=epochs, batch_size=batch_size,
                    grad_accum=grad_accum)
    out = output_dir(out_dir, "checkpoint", overwrite=overwrite) if out_dir is not None else None
    objective, needs_retain, needs_ref = METHODS[method]
    tok = load_tokenizer(tokenizer if tokenizer is not None else model)
    model = load_model(model)
    if mask is not None:
        check_mask(model, mask)
    forget_ex = to_examples(forget, tok, max_length=max_length, template=template, what="forget")
    retain_ex = to_examples(retain, tok, max_length=max_length, template=template, what="retain") if needs_retain else []
    pairs = refusal_pairs(forget_ex, tok, refusals) if method == "dpo" else None
    pad = padding_id(tok)
    torch.manual_seed(seed)

    ref = _frozen_reference(model, reference) if needs_ref else None
    grad_flags = [p.requires_grad for p in model.parameters()]
    trainable, hooks = apply_mask(model, mask)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu" and not distributed)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if ref is not None:
        ref.to(accelerator.device)
    def epoch_data(e: int) -> EpochData:
        return (_forget_batches(forget_ex, pairs, batch_size, pad, seed + e, accelerator),
                _retain_stream(retain_ex, batch_size, pad, seed + 10_000 + e, accelerator))

    hparams = {"beta": beta, "retain_weight": retain_weight, "kl_weight": kl_weight}
    try:
        losses = _train(wrapped, ref, objective, optimizer, accelerator, epoch_data, epochs=epochs,
                        n_batches=-(-len(forget_ex) // batch_size), grad_accum=grad_accum, hparams=hparams,
                        desc=f"unlearn ({method})", progress=progress)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    model = accelerator.unwrap_model(wrapped).eval()
    settings = {"method": method, "lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum,
                "beta": beta, "retain_weight": retain_weight, "kl_weight": kl_weight, "refusals": list(refusals),
                "masked": mask is not None, "max_length": max_length, "template": template, "seed": seed,
                "n_forget": len(forget_ex), "n_retain": len(retain_ex), "n_processes": accelerator.num_processes}
    if out is not None:
        state = accelerator.get_state_dict(wrapped) if accelerator.num_processes > 1 else None
        if accelerator.is_main_process:
            _save(model, tok, settings, losses, out, state)
        accelerator.wait_for_everyone()
    return UnlearnRun(model=model, losses=losses, settings=settings, out_dir=out.path if out is not None else None)
