"""The fine-tuning loop that runs unlearning: one fine-tuning method of the registry
(:mod:`patchlab.unlearning.methods`), optionally restricted to a weight mask or trained as a LoRA adapter, with the
frozen starting model as reference where the method needs one (precomputed, or held on a device of its own)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.progress import quiet
from patchlab.errors import MissingDependencyError, PatchlabValueError
from patchlab.io import OutputDir, atomic_write_json, output_dir
from patchlab.pair import ModelSpec, TokenizerSpec, load_model, load_tokenizer
from patchlab.unlearning.data import Example, collate, padding_id, refusal_pairs, to_examples
from patchlab.unlearning.losses import REF_LOGPROB, Batch, Reference, Step, sequence_logprob
from patchlab.unlearning.masks import Mask, apply_mask, check_mask, mask_before_step
from patchlab.unlearning.methods import Method, Needs, get_method
from patchlab.unlearning.settings import TRAINING_FIELDS, ReferenceSettings, TrainingSettings, training_settings

#: One epoch's data: its (forget batch, preferred batch or None) pairs, and its endless retain batch stream.
EpochData = tuple[list[tuple[Batch, Batch | None]], Iterator[Batch | None]]

#: Keys of the ``lora=`` argument of :func:`unlearn` and their defaults (peft's ``LoraConfig`` fields ``r``,
#: ``lora_alpha``, ``target_modules``, ``lora_dropout``; ``target_modules=None``: peft's default for the family).
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "target_modules": None, "dropout": 0.0}


@dataclass
class UnlearnRun:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (the input model, updated in place), in eval mode; with ``lora=``, a
            ``peft.PeftModel`` around it (``run.model.merge_and_unload()`` folds the adapter into the weights).
        losses: the loss curve: the objective at every optimizer step (mean over its micro-batches, of the
            global batch across processes).
        settings: the run's hyper-parameters, as saved in ``unlearn_run.json``.
        out_dir: where the checkpoint (or adapter) was saved, if anywhere.
        main_process: false in the other processes of a multi-process run (only the main one writes and reports).
    """

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    main_process: bool = True


# ----------------------------------------------------------------------------------------------- LoRA


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise MissingDependencyError("LoRA training needs peft: pip install 'patchlab[peft]'") from err
    return peft


def lora_settings(lora: Mapping[str, Any]) -> dict[str, Any]:
    """``lora`` completed with :data:`LORA_DEFAULTS` and validated.

    Raises:
        PatchlabValueError: not a mapping, an unknown key (the message lists the valid ones), ``r`` not a positive
            integer, ``alpha <= 0``, ``dropout`` outside ``[0, 1)``, or ``target_modules`` not a list of names.
    """
    if not isinstance(lora, Mapping):
        raise PatchlabValueError(f"lora must be a dict with keys {', '.join(LORA_DEFAULTS)}, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise PatchlabValueError(f"unknown LoRA setting {', '.join(map(repr, unknown))}; valid: "
                                 f"{', '.join(LORA_DEFAULTS)}")
    cfg = {**LORA_DEFAULTS, **lora}
    if isinstance(cfg["r"], bool) or not isinstance(cfg["r"], int) or cfg["r"] < 1:
        raise PatchlabValueError(f"LoRA r must be a positive integer, got {cfg['r']!r}")
    if not isinstance(cfg["alpha"], (int, float)) or not cfg["alpha"] > 0:
        raise PatchlabValueError(f"LoRA alpha must be > 0, got {cfg['alpha']!r}")
    if not isinstance(cfg["dropout"], (int, float)) or not 0 <= cfg["dropout"] < 1:
        raise PatchlabValueError(f"LoRA dropout must lie in [0, 1), got {cfg['dropout']!r}")
    targets = cfg["target_modules"]
    if targets is not None:
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise PatchlabValueError(f"LoRA target_modules must be a non-empty list of module names, got {targets!r}")
        cfg["target_modules"] = list(targets)
    return cfg


def lora_model(model: PreTrainedModel, lora: Mapping[str, Any]) -> nn.Module:
    """``model`` wrapped as a ``peft.PeftModel`` with a fresh LoRA adapter (:func:`lora_settings`); only the
    adapter is trainable. The adapter starts at zero (peft's default), so the wrapped model computes what
    ``model`` did.

    Raises:
        MissingDependencyError: peft is not installed. PatchlabValueError: bad settings, or no target module found.
    """
    peft = _peft()
    cfg = lora_settings(lora)
    config = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["target_modules"],
                             lora_dropout=cfg["dropout"], task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise PatchlabValueError(f"cannot add a LoRA adapter: {err}") from err


@contextlib.contextmanager
def _adapter_free(peft_model: nn.Module) -> Iterator[None]:
    """The LoRA-trained model as its own frozen reference: adapter off, eval mode, restored after."""
    training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(training)


# ----------------------------------------------------------------------------------------------- checks


def _restrict(model: nn.Module, mask: Mask | None, names: Sequence[str], method: str) -> Mask:
    """The weight mask that trains only the parameters ``names`` (a method's ``trainable``), within ``mask``."""
    params = dict(model.named_parameters())
    keep = {n: torch.ones(params[n].shape, dtype=torch.bool) for n in names}
    if mask is None:
        return keep
    combined = {n: m & mask[n].cpu() for n, m in keep.items() if n in mask}
    if not any(m.any() for m in combined.values()):
        raise PatchlabValueError(f"the weight mask selects none of the weights method {method!r} trains "
                                 f"({', '.join(names)})")
    return combined


# ----------------------------------------------------------------------------------------------- data


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
                    seed: int, accelerator: Accelerator) -> list[tuple[Batch, Batch | None]]:
    """One epoch of (forget batch, preferred batch), shuffled with ``seed``; the preferred batch (DPO's refusals,
    paired row by row) is ``None`` without ``pairs``."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for start in range(0, len(order), batch_size):
        idx = _process_share(order[start:start + batch_size], accelerator)
        if pairs is None:
            out.append((collate([examples[i] for i in idx], pad), None))
        else:
            out.append((collate([pairs[i][1] for i in idx], pad), collate([pairs[i][0] for i in idx], pad)))
    return out


def _retain_stream(examples: list[Example], batch_size: int, pad: int, seed: int,
                   accelerator: Accelerator) -> Iterator[Batch | None]:
    """Endless retain batches (shuffled with ``seed``, cycled), or ``None`` forever when there is no retain set."""
    if not examples:
        return itertools.repeat(None)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    shares = [_process_share(order[i:i + batch_size], accelerator) for i in range(0, len(order), batch_size)]
    return itertools.cycle([collate([examples[i] for i in idx], pad) for idx in shares])


@torch.no_grad()
def precompute_reference(model: nn.Module, epochs: Sequence[EpochData], *, progress: bool = False,
                         context: contextlib.AbstractContextManager | None = None) -> None:
    """Store the reference's sequence log-probabilities in every forget and preferred batch of every epoch
    (``batch["ref_logprob"]``, ``[batch]``, on the model's device), in eval mode.

    They are computed on exactly the batches training will see, so the objectives get the same numbers as from a
    held reference, bit for bit: one no-grad forward per batch and epoch, the compute a held reference costs,
    without keeping the model.
    """
    training = model.training
    model.eval()
    batches = [b for forget, _ in epochs for pair in forget for b in pair if b is not None]
    with context or contextlib.nullcontext():
        for batch in tqdm(batches, desc="reference log-probabilities", disable=not progress, leave=False):
            batch[REF_LOGPROB] = sequence_logprob(model, batch)
    model.train(training)


# ----------------------------------------------------------------------------------------------- training


def _checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Switch ``transformers``' (non-reentrant) activation checkpointing on or off (``activation_checkpointing_*``
    since transformers 5, ``gradient_checkpointing_*`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _on_cpu(model: nn.Module) -> bool:
    """Whether training stays on the CPU: the model is there, and either this is one process or there is no GPU
    for the processes of a distributed launch (Accelerate then runs them on the CPU with gloo; several processes
    with a GPU take one GPU each)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return next(model.parameters()).device.type == "cpu" and not (distributed and torch.cuda.is_available())



def _train(wrapped: nn.Module, base: PreTrainedModel, method: Method, settings: Any, state: Any,
           reference: Reference | None, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
           epochs: Sequence[EpochData], *, grad_accum: int, desc: str, progress: bool,
           max_grad_norm: float | None = None) -> list[float]:
    """Run the optimisation; returns the objective at each optimizer step (mean over its micro-batches, of the
    global batch)."""
    losses: list[float] = []
    wrapped.train()
    bar = tqdm(total=sum(len(forget) for forget, _ in epochs), desc=desc, disable=not progress)

    def all_sum(count: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(count.to(accelerator.device), reduction="sum")

    for epoch, (forget, retain) in enumerate(epochs):
        for b, (forget_batch, chosen) in enumerate(forget):
            group_start = b - b % grad_accum
            group = min(grad_accum, len(forget) - group_start)
            last = b == group_start + group - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                step = Step(model=wrapped, base=base, forget=forget_batch, retain=next(retain), chosen=chosen,
                            reference=reference, state=state, n_processes=accelerator.num_processes, all_sum=all_sum)
                loss = method.loss(step, settings)
                if not torch.isfinite(loss):
                    raise PatchlabValueError(f"the {desc} loss became {loss.item()} at epoch {epoch}, batch {b}; "
                                             "lower the learning rate")
                accelerator.backward(loss / group)
            if b == group_start:
                step_loss = 0.0
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / group
            if last:
                if max_grad_norm is not None:
                    accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return losses


def _save(model: nn.Module, tokenizer: PreTrainedTokenizerBase, settings: dict, losses: list[float],
          out_dir: OutputDir, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint (or, for a ``PeftModel``, the adapter: ``adapter_config.json`` and
    ``adapter_model.safetensors``), the tokenizer and ``unlearn_run.json`` into the claimed ``out_dir``
    (:meth:`OutputDir.write_tree`).

    ``state_dict``: the full weights when they are sharded across processes (FSDP); default the model's own.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "unlearn_run.json", {"settings": settings, "losses": losses})

    out_dir.write_tree(write)


def _reference(needs: Needs, settings: ReferenceSettings, model: PreTrainedModel, peft_model: nn.Module | None,
               device: torch.device) -> tuple[Reference | None, nn.Module | None, Any]:
    """(what the objectives see, the model to precompute log-probabilities with or ``None``, its context).

    The held model is ``settings.model``, else the LoRA model with its adapter off, else a deep copy of ``model``
    (made before any update); it sits on ``settings.device`` (default: the training device).
    """
    if needs.reference == "none":
        return None, None, None
    held = needs.reference == "model" or settings.mode == "held"
    context: Any = contextlib.nullcontext
    if settings.model is not None:
        source = settings.model.eval().requires_grad_(False).to(settings.device or device)
    elif peft_model is not None:
        source, context = peft_model, lambda: _adapter_free(peft_model)
    elif held:
        source = copy.deepcopy(model).eval().requires_grad_(False).to(settings.device or device)
    else:
        source = model  # precompute only: the starting model itself, before its first update
    base = peft_model.get_base_model() if source is peft_model else source
    reference = Reference(source if held else None, out_device=device, base=base, context=context)
    return reference, (source if settings.mode == "precompute" else None), context


def unlearn(model: ModelSpec, forget: Any, retain: Any = None, *, tokenizer: TokenizerSpec = None, method: str,
            training: TrainingSettings | None = None, reference: ReferenceSettings | str = "precompute",
            mask: Mask | None = None, lora: Mapping[str, Any] | None = None,
            out_dir: str | os.PathLike | OutputDir | None = None, overwrite: bool = False, progress: bool = True,
            **settings: Any) -> UnlearnRun:
    """Unlearn ``forget`` from ``model`` by fine-tuning with ``method``; returns an :class:`UnlearnRun`
    (``.model``, ``.losses`` the loss curve, ``.settings``, ``.out_dir``).

    Args:
        model: in-memory causal LM (updated in place; pass ``copy.deepcopy(model)`` to keep the original),
            local checkpoint directory or hub id. It trains on its own device (move it to ``cuda`` first); under
            ``accelerate launch`` with several processes Accelerate places and wraps it (DDP / FSDP), each process
            takes its share of every global batch and the loss curve is that of one process with the whole batch.
        forget: texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path or a ``datasets.Dataset``.
        retain: same forms; required by the methods whose data needs include a retain set, ignored by the others.
        tokenizer: defaults to the checkpoint's when ``model`` is a path.
        method: a fine-tuning method of the registry (:func:`patchlab.unlearning.methods.method_names`:
            ``dpo``, ``ga``, ``graddiff``, ``npo``, ``npo_kl``, ``rmu``, ``simnpo``; formulas in each file of
            :mod:`patchlab.unlearning.methods`).
        training: the training recipe (:class:`~patchlab.unlearning.settings.TrainingSettings`: learning rate,
            epochs, batch size, gradient accumulation, truncation, prompt template, seed, gradient clipping, masking
            order, gradient checkpointing); default ``TrainingSettings()``. Each field may also be given as a flat
            keyword (``lr=1e-3, epochs=2``), which replaces that field of ``training``.
        reference: how the methods that need the frozen starting model get it
            (:class:`~patchlab.unlearning.settings.ReferenceSettings`: mode, reference model, its device), or just
            its mode, ``"precompute"`` (default) or ``"held"``.
        mask: ``{parameter name: bool tensor}`` (e.g. from :mod:`patchlab.unlearning.attribution`); only selected
            weights change, parameters without a selected weight are frozen.
        lora: train a LoRA adapter instead of the weights (needs peft): ``{"r": 8, "alpha": 16,
            "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}`` (:data:`LORA_DEFAULTS`). ``out_dir`` then
            gets the adapter (``adapter_config.json``, ``adapter_model.safetensors``) instead of a checkpoint, and
            the frozen reference is the same model with its adapter off (no copy). Not combined with ``mask``.
        out_dir: if given, the checkpoint (safetensors), tokenizer and ``unlearn_run.json`` (settings, loss curve)
            are written there (by the main process; see :class:`patchlab.io.OutputDir`). It is checked before
            training: a directory holding anything patchlab did not write is refused, an earlier checkpoint is
            replaced only with ``overwrite=True``, and files you added beside it are never removed.
        progress: show a tqdm bar with the current loss.
        **settings: the method's own settings (its ``Settings`` dataclass, e.g. ``beta=0.1`` for NPO; unset ones
            take the method's defaults) and flat :class:`~patchlab.unlearning.settings.TrainingSettings` fields.

    Raises:
        PatchlabValueError: unknown method or setting (the message lists the valid ones), empty forget set,
            missing retain set, a reference device this machine lacks, bad mask, LoRA, training or reference
            settings, or a loss that became NaN/infinite.
        PatchlabFileError: ``out_dir`` is not a usable output directory (checked before training, see
            :class:`patchlab.io.OutputDir`): a file, unwritable, holding files patchlab did not write, or an earlier
            checkpoint without ``overwrite=True``.
        MissingDependencyError: ``lora=`` without peft installed.
    """
    entry = get_method(method, kind="finetune")
    flat, method_settings = split_settings(method, settings)
    needs = entry.data_needs(method_settings)
    training = training_settings(training, flat)
    if not isinstance(reference, ReferenceSettings):
        reference = ReferenceSettings(mode=reference)
    if needs.retain and retain is None:
        raise PatchlabValueError(f"method {method!r} needs a retain set (retain=...)")
    if lora is not None:
        lora = lora_settings(lora)
        _peft()
        if mask is not None:
            raise PatchlabValueError("pass either a weight mask or lora=, not both")
        if reference.device is not None and reference.model is None:
            raise PatchlabValueError("the reference of a LoRA run is its own base model (adapter off); a reference "
                                     "device does not apply (pass ReferenceSettings(model=...) to use another)")
    out = output_dir(out_dir, "checkpoint", overwrite=overwrite) if out_dir is not None else None
    tok = load_tokenizer(tokenizer if tokenizer is not None else model)
    model = load_model(model)
    if mask is not None:
        check_mask(model, mask)
    forget_ex = to_examples(forget, tok, max_length=training.max_length, template=training.template, what="forget")
    retain_ex = to_examples(retain, tok, max_length=training.max_length, template=training.template,
                            what="retain") if needs.retain else []
    pairs = refusal_pairs(forget_ex, tok, needs.refusals) if needs.refusals else None
    pad = padding_id(tok)
    torch.manual_seed(training.seed)

    masked = mask is not None
    checkpointing = training.gradient_checkpointing
    if checkpointing and not model.supports_gradient_checkpointing:
        raise PatchlabValueError(f"{type(model).__name__} does not support gradient checkpointing")

    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    hooks: list[Any] = []
    try:
        state = entry.setup(model, method_settings, training.seed) if entry.setup else None
        if entry.trainable is not None and lora is None:
            mask = _restrict(model, mask, entry.trainable(model, method_settings), method)
        peft_model = lora_model(model, lora) if lora is not None else None
        accelerator = Accelerator(cpu=_on_cpu(model))
        ref, precompute_with, ref_context = _reference(needs, reference, model, peft_model, accelerator.device)
        after_clipping = training.mask_after_clipping and mask is not None  # never with LoRA, which refuses a mask
        if peft_model is not None:
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
        else:
            trainable, hooks = apply_mask(model, mask, after_clipping=after_clipping)
        if checkpointing:
            _checkpointing(model, True)
        optimizer = torch.optim.AdamW(trainable, lr=training.lr, weight_decay=0.0)
        wrapped, prepared_optimizer = accelerator.prepare(peft_model if peft_model is not None else model, optimizer)
        if after_clipping:  # once prepare has put the parameters on the training device, where their masks go
            hooks.append(mask_before_step(optimizer, model, mask))
        epoch_data = [(_forget_batches(forget_ex, pairs, training.batch_size, pad, training.seed + e, accelerator),
                       _retain_stream(retain_ex, training.batch_size, pad, training.seed + 10_000 + e, accelerator))
                      for e in range(training.epochs)]
        if precompute_with is not None:
            if precompute_with is model or precompute_with is peft_model:
                precompute_with = wrapped  # the starting model as prepared (DDP / FSDP shards its weights)
            precompute_reference(precompute_with, epoch_data, progress=progress,
                                 context=ref_context() if ref_context else None)
        losses = _train(wrapped, model, entry, method_settings, state, ref, prepared_optimizer, accelerator,
                        epoch_data, grad_accum=training.grad_accum, desc=f"unlearn ({method})", progress=progress,
                        max_grad_norm=training.max_grad_norm)
    finally:
        for hook in hooks:
            hook.remove()
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        if checkpointing:
            _checkpointing(model, False)
    result = accelerator.unwrap_model(wrapped).eval()
    record = _record(method, training, method_settings, masked=masked, lora=lora,
                     reference=reference.mode if needs.reference != "none" else None, n_forget=len(forget_ex),
                     n_retain=len(retain_ex), n_processes=accelerator.num_processes)
    if out is not None:
        state_dict = accelerator.get_state_dict(wrapped) if accelerator.num_processes > 1 else None
        if accelerator.is_main_process:
            with quiet(not progress):  # transformers' own saving bar follows progress= too
                _save(result, tok, record, losses, out, state_dict)
        accelerator.wait_for_everyone()
    return UnlearnRun(model=result, losses=losses, settings=record, out_dir=out.path if out is not None else None,
                      main_process=accelerator.is_main_process)


#: The :class:`~patchlab.unlearning.settings.TrainingSettings` fields ``unlearn_run.json`` lists right after the
#: method, ahead of the method's own settings.
SCHEDULE = ("lr", "epochs", "batch_size", "grad_accum")


def _record(method: str, training: TrainingSettings, method_settings: Any, **run: Any) -> dict[str, Any]:
    """A run's settings as saved in ``unlearn_run.json``: the method, its :data:`SCHEDULE`, the method's own
    settings, the run's ``masked`` / ``lora`` / ``reference``, the other training settings, then the counts in
    ``run`` (``n_forget``, ``n_retain``, ``n_processes``)."""
    recipe = dataclasses.asdict(training)
    facts = ("masked", "lora", "reference")
    return {"method": method, **{k: recipe[k] for k in SCHEDULE}, **dataclasses.asdict(method_settings),
            **{k: run[k] for k in facts}, **{k: v for k, v in recipe.items() if k not in SCHEDULE},
            **{k: v for k, v in run.items() if k not in facts}}


#: The keyword arguments :func:`unlearn` takes besides a method's own settings: its keyword-only parameters and the
#: :class:`~patchlab.unlearning.settings.TrainingSettings` fields it takes flat.
UNLEARN_ARGS = frozenset(name for name, p in inspect.signature(unlearn).parameters.items()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY) | frozenset(TRAINING_FIELDS)


def split_settings(method: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Split keyword arguments for :func:`unlearn` (e.g. a method-sweep strength, or the toy world's settings) into
    its common arguments and ``method``'s settings object.

    Raises:
        PatchlabValueError: unknown method, or a name that is neither (the message lists the valid ones).
    """
    entry = get_method(method, kind="finetune")
    common = {k: v for k, v in kwargs.items() if k in UNLEARN_ARGS}
    return common, entry.make_settings({k: v for k, v in kwargs.items() if k not in UNLEARN_ARGS})
