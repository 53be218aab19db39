"""MEMIT-style knowledge removal, the editing baselines of Hong et al. (section 4, appendix A).

MEMIT (Meng et al., 2023) treats the MLP down projection ``W`` of layer ``l`` as a linear associative memory
mapping a key ``k`` (its input, the MLP coefficients at the subject's last token, ``[d_mlp]``) to a value
(its output, ``[d_model]``). An edit of ``n`` facts

1. finds, for each fact, a target hidden state ``z = h + delta`` at the output of the *last* edited layer (at
   the subject's last token) by optimising ``delta`` against an objective (with ``||delta||`` clamped to
   ``clamp_norm * ||h||`` and a small ``||delta||`` penalty);
2. spreads the needed change over the edited layers, lowest first: at layer ``l`` with ``m`` layers left, the
   residual ``R = (z - h_now) / m`` (``[d_model, n]``) and the keys ``K`` (``[d_mlp, n]``) give the least-squares
   update that keeps ``W`` close on the key distribution::

       delta_W = R K^T (cov_weight * C + K K^T)^-1,   C = E[k k^T]

   where the uncentred covariance ``C`` of keys is estimated on a text sample (:func:`key_covariance`).

Patil et al. (2024) turn the edit into removal with two objectives, both provided here:

* :func:`memit_empty`: the new object is a dummy (``"nothing"``, which a word-level tokenizer maps to
  ``<unk>``): minimise the NLL of ``dummy + EOS`` after the prompt;
* :func:`memit_entropy`: maximise the entropy (nats) of the next-token distribution at the last prompt token,
  read through the logit lens (final norm + unembedding) of every layer from the last edited one up, the
  model's own output included.

Everything runs in float32 on the model's device; the solve is in float64. Simplifications with respect to the
original code: one prompt per fact (no random context prefixes) and no KL "essence" term. On the toy world the
model reads most of an answer at the last prompt token, so an edit keyed on the subject token removes only part
of the target answers (tests/test_editing.py records the measured fractions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.defaults import MEMIT_DEFAULTS, MEMIT_EMPTY_DUMMY
from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, encode_prompts, format_prompts
from patchlab.pair.sites import StopForward, hook, hooks, recording
from patchlab.unlearning.data import Example, collate, padding_id


@dataclass(frozen=True)
class EditRequest:
    """One fact to remove: a question and the subject it is about (which must occur in the question).

    The edit is keyed on the subject's last token, so other questions about the same subject change too, and
    questions about other subjects mostly do not.
    """

    question: str
    subject: str


@dataclass
class EditRun:
    """What :func:`memit_empty` / :func:`memit_entropy` return.

    Attributes:
        model: the edited model (the input model, updated in place), in eval mode.
        layers: the edited layers, ascending.
        losses: the objective's final value per request (nats; negative entropy for ``entropy``).
        update_norms: Frobenius norm of the weight update per edited layer.
        settings: the hyper-parameters of the run.
    """

    model: PreTrainedModel
    layers: list[int]
    losses: list[float] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def default_layers(n_layers: int) -> list[int]:
    """A small block of early-middle layers, MEMIT's choice scaled to depth: ``n // 6`` .. ``n // 6 + n // 3 - 1``
    (layers 1-2 of 6, 5-14 of 32), at least one layer."""
    start = n_layers // 6
    return list(range(start, start + max(1, n_layers // 3)))


def edit_layers(model: PreTrainedModel, layers: Sequence[int] | None = None) -> list[int]:
    """The layers to edit, ascending and unique: ``layers``, or :func:`default_layers` when it is ``None``.

    Raises:
        PatchlabValueError: ``layers`` is empty or holds an index outside ``0..L-1``.
    """
    n_layers = len(arch_spec(model).layer_modules(model))
    out = sorted(set(default_layers(n_layers) if layers is None else layers))
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise PatchlabValueError(f"edit layers must be a non-empty subset of 0..{n_layers - 1}, got {layers!r}")
    return out


def _check_texts(texts: Sequence[str], name: str) -> None:
    """Raise unless ``texts`` is a non-empty list of strings (the key-covariance sample)."""
    if isinstance(texts, str) or len(texts) == 0 or not all(isinstance(t, str) for t in texts):
        raise PatchlabValueError(f"{name} must be a non-empty list of texts (for the toy model: "
                                 "patchlab.toy.world().training_texts())")


def subject_position(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[Int[torch.Tensor, "seq"], int]:
    """Token ids of ``prompt`` (as :func:`patchlab.pair.generation.encode_prompts` gives them) and the index of the
    last token of the last occurrence of ``subject`` in it."""
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise PatchlabValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    if not hits:
        raise PatchlabValueError(f"subject {subject!r} maps to no token of {prompt!r}")
    return torch.tensor(enc["input_ids"], dtype=torch.long), hits[-1]


@torch.no_grad()
def key_covariance(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   layers: Sequence[int], *, batch_size: int = 16, progress: bool = False
                   ) -> dict[int, Float[torch.Tensor, "mlp mlp"]]:
    """Uncentred second moment ``E[k k^T]`` of the down-projection inputs of ``layers`` over every token of
    ``texts`` (padding excluded), float64 ``[d_mlp, d_mlp]`` per layer.

    Each forward pass stops after the highest requested layer's MLP, so layers above it cost nothing.

    Raises:
        PatchlabValueError: no text, a text that encodes to no token, bad layers or ``batch_size < 1``.
    """
    _check_texts(texts, "texts")
    if batch_size < 1:
        raise PatchlabValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = edit_layers(model, layers)
    encoded = [Example(ids, ids, 0) for ids in encode_prompts(tokenizer, texts)]  # only ids and mask are used
    pad = padding_id(tokenizer)
    spec = arch_spec(model)
    sums: dict[int, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def accumulate(layer: int) -> Callable:
        def read(coef: torch.Tensor) -> None:
            keys = coef[mask_now[0]].double()
            sums[layer] = sums.get(layer, 0) + keys.T @ keys
            if layer == layers[-1]:
                raise StopForward
        return read

    coef = spec.site("coef")
    reads = [(spec.site_module(model, coef, l), coef.cached, accumulate(l)) for l in layers]
    device = next(model.parameters()).device
    count = 0
    with hooks(reads):
        for i in tqdm(range(0, len(encoded), batch_size), desc="key covariance", disable=not progress, leave=False):
            batch = collate(encoded[i:i + batch_size], pad)
            mask = batch["attention_mask"]
            mask_now[:] = [mask.bool().to(device)]
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device))
            except StopForward:
                pass
            count += int(mask.sum())
    return {l: sums[l] / count for l in layers}


def _regularised(matrix: Float[torch.Tensor, "mlp mlp"], ridge: float = 1e-6) -> Float[torch.Tensor, "mlp mlp"]:
    """``matrix + ridge * mean(diag) * I``: keeps the solve defined when the text sample spans too few keys."""
    return matrix + ridge * matrix.diagonal().mean() * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)


def _add_at(module: nn.Module, position: int, delta: torch.Tensor) -> contextlib.AbstractContextManager:
    """While active, add ``delta`` ``[d_model]`` to ``module``'s output hidden states at ``position``."""
    def add(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, position] += delta.to(hidden.dtype)
        return hidden
    return hook(module, "output", add)


# An objective runs the model on one prompt (with the edit's delta hook active) and returns the loss to minimise.
Objective = Callable[[PreTrainedModel, Int[torch.Tensor, "seq"]], Float[torch.Tensor, ""]]


def empty_objective(target_ids: Int[torch.Tensor, "target"]) -> Objective:
    """Mean NLL (nats/token) of ``target_ids`` teacher-forced after the prompt (MEMIT+Empty)."""
    def loss(model: PreTrainedModel, prompt_ids: Int[torch.Tensor, "seq"]) -> Float[torch.Tensor, ""]:
        ids = torch.cat([prompt_ids, target_ids.to(prompt_ids.device)])
        logits = model(input_ids=ids[None]).logits[0, len(prompt_ids) - 1:-1].float()
        return nn.functional.cross_entropy(logits, ids[len(prompt_ids):])
    return loss


def entropy_objective(model: PreTrainedModel, from_layer: int) -> Objective:
    """Minus the mean entropy (nats) of the next-token distribution at the last prompt token, over the logit
    lens of ``model``'s layers ``from_layer`` .. ``L-2`` and the model's own output (MEMIT+Entropy).

    The lens modules are resolved here, once; the objective must be called with this ``model``.

    Raises:
        PatchlabValueError: ``from_layer`` is not a layer index of ``model``.
    """
    layers = list(arch_spec(model).layer_modules(model))
    if not 0 <= from_layer < len(layers):
        raise PatchlabValueError(f"from_layer must be a layer index in 0..{len(layers) - 1}, got {from_layer}")
    lens_layers = layers[from_layer:-1]
    norm, unembed = arch_spec(model).norm(model), model.get_output_embeddings()

    def loss(model: PreTrainedModel, prompt_ids: Int[torch.Tensor, "seq"]) -> Float[torch.Tensor, ""]:
        with recording(lens_layers, "output") as hidden:
            logits = model(input_ids=prompt_ids[None]).logits[0, -1:].float()
        lens = [unembed(norm(h[0, -1:])).float() for h in hidden]
        logp = torch.log_softmax(torch.cat([*lens, logits]), dim=-1)
        return (logp.exp() * logp).sum(-1).mean()
    return loss


def _target_delta(model: PreTrainedModel, spec: ArchSpec, layer: int, prompt_ids: torch.Tensor, position: int,
                  objective: Objective, *, steps: int, lr: float, clamp_norm: float, weight_decay: float
                  ) -> tuple[Float[torch.Tensor, "d_model"], float]:
    """MEMIT's ``compute_z``: the change of ``layer``'s output at ``position`` that minimises ``objective``."""
    module = spec.layer_modules(model)[layer]
    with torch.no_grad(), recording([module], "output") as out:
        model(input_ids=prompt_ids[None])
    h = out[0][0, position].detach().float()
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm * h.norm()
    for _ in range(steps):
        with _add_at(module, position, delta):
            loss = objective(model, prompt_ids)
        total = loss + weight_decay * delta.norm() / h.norm() ** 2
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    with torch.no_grad(), _add_at(module, position, delta):
        final = float(objective(model, prompt_ids))
    return delta.detach(), final


@torch.no_grad()
def _states(model: PreTrainedModel, spec: ArchSpec, layer: int, last: int, prompts: Sequence[torch.Tensor],
            positions: Sequence[int]) -> tuple[Float[torch.Tensor, "mlp n"], Float[torch.Tensor, "d_model n"]]:
    """Keys (down-projection inputs of ``layer``) and outputs of layer ``last`` at each prompt's subject position."""
    layers = spec.layer_modules(model)
    coef = spec.site("coef")
    keys, outs = [], []
    for ids, pos in zip(prompts, positions):
        with recording([spec.site_module(model, coef, layer)], coef.cached) as k, \
                recording([layers[last]], "output") as h:
            model(input_ids=ids[None])
        keys.append(k[0][0, pos])
        outs.append(h[0][0, pos])
    return torch.stack(keys, 1).double(), torch.stack(outs, 1).double()


def memit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
          objective: Callable[[EditRequest], Objective], *, cov_texts: Sequence[str],
          layers: Sequence[int] | None = MEMIT_DEFAULTS["layers"], cov_weight: float = MEMIT_DEFAULTS["cov_weight"],
          steps: int = MEMIT_DEFAULTS["steps"], lr: float = MEMIT_DEFAULTS["lr"],
          clamp_norm: float = MEMIT_DEFAULTS["clamp_norm"], weight_decay: float = MEMIT_DEFAULTS["weight_decay"],
          template: str = DEFAULT_TEMPLATE, settings: dict[str, Any] | None = None, progress: bool = True) -> EditRun:
    """Edit ``model`` in place so that each request's prompt minimises ``objective(request)`` (see module doc).

    Args:
        requests: the facts (question + subject) to edit, all at once.
        objective: builds the per-request loss (:func:`empty_objective`, :func:`entropy_objective`).
        cov_texts: text sample for ``C = E[k k^T]``, drawn from the model's training distribution (for the toy
            model: ``patchlab.toy.world().training_texts()``).
        layers: edited layers (default :func:`default_layers`).
        cov_weight: weight of ``C`` against the edit keys (MEMIT's ``mom2_update_weight``); larger = gentler edit.
        steps, lr, clamp_norm, weight_decay: the optimisation of each target ``delta`` (Adam).
        template: prompt template (must match the one used to query the model).

    Raises:
        PatchlabValueError: no request, no cov_texts, a subject missing from its question, bad layers or
            hyper-parameters.
        NonFiniteError: the update is not finite.
    """
    if not requests:
        raise PatchlabValueError("memit needs at least one EditRequest")
    _check_texts(cov_texts, "cov_texts")
    for name, value in (("cov_weight", cov_weight), ("lr", lr), ("clamp_norm", clamp_norm)):
        if not value > 0:
            raise PatchlabValueError(f"{name} must be > 0, got {value}")
    if not isinstance(steps, int) or steps < 1:
        raise PatchlabValueError(f"steps must be a positive integer, got {steps!r}")
    spec = arch_spec(model)
    layers = edit_layers(model, layers)
    model.eval()
    device = next(model.parameters()).device
    located = [subject_position(tokenizer, format_prompts([r.question], template)[0], r.subject) for r in requests]
    prompts = [ids.to(device) for ids, _ in located]
    positions = [pos for _, pos in located]
    cov = key_covariance(model, tokenizer, cov_texts, layers, progress=progress)

    params = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        deltas, losses = [], []
        for req, ids, pos in tqdm(list(zip(requests, prompts, positions)), desc="MEMIT targets", disable=not progress,
                                  leave=False):
            delta, final = _target_delta(model, spec, layers[-1], ids, pos, objective(req), steps=steps, lr=lr,
                                         clamp_norm=clamp_norm, weight_decay=weight_decay)
            deltas.append(delta)
            losses.append(final)
    finally:
        for p in params:
            p.requires_grad_(True)
    keys, h = _states(model, spec, layers[0], layers[-1], prompts, positions)
    z = h + torch.stack(deltas, 1).double()
    norms = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i > 0:  # the states of the lowest layer were read above, on the still unedited model
                keys, h = _states(model, spec, layer, layers[-1], prompts, positions)
            resid = (z - h) / (len(layers) - i)
            update = resid @ torch.linalg.solve(_regularised(cov_weight * cov[layer]) + keys @ keys.T, keys).T
            if not torch.isfinite(update).all():
                raise NonFiniteError(f"MEMIT update of layer {layer} is not finite; raise cov_weight")
            weight = spec.value_weight(model, layer)
            weight.add_(update.to(weight.dtype))
            norms.append(float(update.norm()))
    run_settings = {"layers": layers, "cov_weight": cov_weight, "steps": steps, "lr": lr, "clamp_norm": clamp_norm,
                    "weight_decay": weight_decay, "n_requests": len(requests), "template": template, **(settings or {})}
    return EditRun(model=model, layers=layers, losses=losses, update_norms=norms, settings=run_settings)


def _dummy_ids(tokenizer: PreTrainedTokenizerBase, dummy: str) -> Int[torch.Tensor, "target"]:
    ids = tokenizer(" " + dummy.strip(), add_special_tokens=False).input_ids
    if not dummy.strip() or not ids:
        raise PatchlabValueError(f"the dummy object must be a non-empty string, got {dummy!r}")
    return torch.tensor(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))


def memit_empty(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
                cov_texts: Sequence[str], dummy: str = MEMIT_EMPTY_DUMMY, **kwargs: Any) -> EditRun:
    """MEMIT+Empty (Patil et al., 2024): rewrite each fact's object to ``dummy`` (then EOS).

    ``cov_texts`` (required, see :func:`memit`) and ``kwargs`` (``layers``, ``cov_weight``, ``steps``,
    ``template``, ...) go to :func:`memit`.
    """
    target = _dummy_ids(tokenizer, dummy).to(next(model.parameters()).device)
    return memit(model, tokenizer, requests, lambda _req: empty_objective(target), cov_texts=cov_texts,
                 settings={"method": "memit_empty", "dummy": dummy}, **kwargs)


def memit_entropy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
                  cov_texts: Sequence[str], layers: Sequence[int] | None = None, **kwargs: Any) -> EditRun:
    """MEMIT+Entropy (Patil et al., 2024): make the next-token distribution after each prompt maximally flat at
    every layer from the last edited one up.

    ``cov_texts`` (required), ``layers`` (default :func:`default_layers`; an empty list is an error) and
    ``kwargs`` go to :func:`memit`.
    """
    layers = edit_layers(model, layers)
    objective = entropy_objective(model, layers[-1])
    return memit(model, tokenizer, requests, lambda _req: objective, cov_texts=cov_texts, layers=layers,
                 settings={"method": "memit_entropy"}, **kwargs)
