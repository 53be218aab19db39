"""The batched restoration engine: many restorations, of many questions, as rows of few forward passes.

Inputs are prepared once per sweep (:class:`PatchStore`): each question's token ids, the *source* model's
activations at the restored sites (the vanilla model in a KRS sweep) and the *target* model's own residual stream
(the unlearned model), both packed per layer as ``[Σ_q seq_q, d]`` on the device of the layer that uses them, and
the metric's references. A *row* is one restoration of one question (:class:`Row`). Rows are sorted by their
first restored layer and their length and cut into batches, across questions, so every forward pass starts at the
lowest first layer of its rows: the layers below are not run, their output is the target's cached residual stream
(exact, since nothing differs there). Sequences of a batch are right-padded; with causal attention padding never
reaches a real position, so no attention mask is needed.

Inside the forward pass nothing waits on the host: the row and position indices of every (layer, site) are built
on the host before the pass and moved to the device once, and restorations touch only the restored rows and
positions: they are gathered (``index_select``), given to the site's restore kind (:mod:`patchlab.patching.restore`)
and written back (``index_copy``), never ``torch.where`` over whole tensors. The LM head runs only on the
positions that predict the answer tokens, and on at most ``max_logits_bytes`` of logits at a time
(:func:`logit_rows`).

Memory: the store holds :func:`question_cache_bytes` per question (a sweep prepares as many questions together as
its memory budget allows, :func:`patchlab.patching.sweep.plan_chunks`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.arch import ArchSpec, n_heads
from patchlab.pair.placement import execution_device, input_device
from patchlab.pair.weights import CheckpointWeights, ModelWeights, site_params
from patchlab.pair.sites import Component, Site, StopForward, hook, hooks
from patchlab.patching.metrics import Metric, References
from patchlab.patching.restore import Restoration, RestoreKind, head_mask, restore_kind
from patchlab.patching.windows import Window


# ------------------------------------------------------------------------------------------------ placement

#: Where recompute / per-head restorations read the source parameters: ``params(site, layer, device) -> dict``.
WeightSource = ModelWeights | CheckpointWeights


#: The execution device of a target module (:func:`patchlab.pair.placement.execution_device`).
Placement = Callable[[nn.Module], torch.device]


def placement(model: PreTrainedModel) -> Placement:
    """``execution_device(model, module)`` looked up once per module (the lookup walks ``model.named_modules()``)."""
    return functools.cache(functools.partial(execution_device, model))


# ------------------------------------------------------------------------------------------------ the store

def _key(site: str, layer: int) -> str:
    return f"{site}@{layer}"


@dataclass
class PatchStore:
    """Everything a sweep needs besides the target model, prepared once.

    Attributes:
        spec: the family's architecture spec (its site table).
        ids: per question, ``[seq_q]`` token ids (CPU). prompt_lens, answer_lens: per question.
        source: packed source activations, ``"{site}@{layer}" -> [Σ_q seq_q, d]`` (only the cached sites in use).
        target_resid: packed target residual stream after each layer, ``layer -> [Σ_q seq_q, d_model]``.
        resid_tuple: whether the decoder layers return tuples (the cached output is re-wrapped alike).
        refs: per question, the metric references (on the LM head's device). weights: per question, the metric's
            pooling weight (``None`` without a pooled form).
        source_weights: where recompute / per-head sites read the source parameters.
    """

    spec: ArchSpec
    ids: list[torch.Tensor]
    prompt_lens: list[int]
    answer_lens: list[int]
    source: dict[str, torch.Tensor] = field(default_factory=dict)
    target_resid: dict[int, torch.Tensor] = field(default_factory=dict)
    resid_tuple: bool = False
    refs: list[References] = field(default_factory=list)
    weights: list[float | None] = field(default_factory=list)
    source_weights: WeightSource | None = None

    @property
    def offsets(self) -> list[int]:
        """Start of each question in the packed ``[Σ_q seq_q, d]`` tensors."""
        out, start = [], 0
        for ids in self.ids:
            out.append(start)
            start += len(ids)
        return out

    def scored_positions(self, q: int) -> Int[torch.Tensor, "answer"]:
        """Positions whose logits predict question ``q``'s answer tokens: ``prompt_len - 1 .. seq - 2``."""
        return torch.arange(self.prompt_lens[q] - 1, self.prompt_lens[q] - 1 + self.answer_lens[q])


def hidden_size(model: PreTrainedModel) -> int:
    """The width of the residual stream, ``d_model`` (the config's, or its text config's, ``hidden_size``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the LM head: the vocabulary the logits span."""
    return int(model.get_output_embeddings().weight.shape[0])


def site_width(model: PreTrainedModel, spec: ArchSpec, site: Site) -> int:
    """Features per token of ``site``'s cached point (0 for sites read from the weights): the module's
    ``in_features`` / ``out_features`` for ``nn.Linear`` (GPT-2's ``Conv1D`` alike), else ``d_model`` (a decoder
    layer's or an MLP block's output)."""
    if site.cached is None:
        return 0
    module = spec.site_module(model, site, 0)
    if isinstance(module, nn.Linear):
        return module.in_features if site.cached == "input" else module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0 if site.cached == "input" else 1]
    return hidden_size(model)


def question_cache_bytes(model: PreTrainedModel, spec: ArchSpec, sites: Sequence[Site], seq_len: int,
                         answer_len: int, dtype: torch.dtype) -> int:
    """Bytes a :class:`PatchStore` keeps for one question of ``seq_len`` tokens, ``answer_len`` of them scored::

        layers x seq_len x (Σ_sites width + d_model) x bytes(dtype)  +  2 x answer_len x vocab x 4

    the source activations at the cached ``sites`` and the target's residual stream after every layer, in the
    models' ``dtype``, and the two float32 reference logits (vanilla and unlearned). ``model`` may be on the meta
    device (only module shapes are read)."""
    per_token = sum(site_width(model, spec, site) for site in sites) + hidden_size(model)
    activations = len(spec.layer_modules(model)) * seq_len * per_token * torch.empty(0, dtype=dtype).element_size()
    return activations + 2 * answer_len * vocab_size(model) * 4


def logit_rows(rows: int, answer: int, vocab: int, max_logits_bytes: int | None) -> int:
    """Rows whose float32 logits ``[rows, answer, vocab]`` fit in ``max_logits_bytes`` (at least 1; all ``rows``
    when ``None``)."""
    if max_logits_bytes is None:
        return rows
    return max(1, min(rows, max_logits_bytes // (answer * vocab * 4)))


@contextlib.contextmanager
def head_gather(model: PreTrainedModel, index: Int[torch.Tensor, "flat"], shape: tuple[int, int],
                device: torch.device | None = None) -> Iterator[None]:
    """While active, the LM head sees only the hidden states at ``index`` (flat ``row * seq + position`` indices),
    reshaped to ``shape = (rows, kept)``: the model's logits come out ``[rows, kept, vocab]``, with whatever the
    family applies after its head (soft-capping, scaling) included. ``device``: the head's execution device
    (looked up when not given)."""
    head = model.get_output_embeddings()
    # moved before the pass: nothing in it waits on the host
    index = index.to(execution_device(model, head) if device is None else device)

    def gather(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_select(0, index).view(*shape, x.shape[-1])

    with hook(head, "input", gather):
        yield


def right_padded(sequences: Sequence[torch.Tensor]) -> tuple[Int[torch.Tensor, "batch width"],
                                                            Int[torch.Tensor, "tokens"]]:
    """Sequences right-padded with 0 into ``[batch, width]``, and the flat ``row * width + position`` index of every
    real token (so ``padded.view(-1)[index]`` concatenates the sequences). With causal attention, padding after a
    sequence never reaches its real positions, so no attention mask is needed."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)] = seq
    index = torch.cat([b * width + torch.arange(len(seq)) for b, seq in enumerate(sequences)])
    return ids, index


def scored_index(scored: Sequence[Int[torch.Tensor, "answer"]], width: int) -> tuple[Int[torch.Tensor, "flat"], int]:
    """The flat ``row * width + position`` index of each row's ``scored`` positions, every row made as long as the
    longest (``answer``) by repeating its last position, and ``answer``: :func:`head_gather`'s index of a
    right-padded batch (``[rows * answer]``, logits ``[rows, answer, vocab]``)."""
    answer = max(len(k) for k in scored)
    return torch.cat([b * width + k[torch.arange(answer).clamp(max=len(k) - 1)] for b, k in enumerate(scored)]), answer


@torch.no_grad()
def capture(model: PreTrainedModel, spec: ArchSpec, sequences: Sequence[Int[torch.Tensor, "seq"]],
            sites: Sequence[Site], scored: Sequence[Int[torch.Tensor, "answer"]], *, resid: bool = False,
            group: int = 16) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], bool]:
    """Run ``model`` on ``sequences`` (right-padded, ``group`` per forward pass) and read the cached point of every
    site in every layer (and the residual stream after every layer when ``resid``) through
    :func:`patchlab.pair.sites.hook`, and the logits at each sequence's ``scored`` positions.

    Returns:
        ``"{site}@{layer}" -> [Σ_q seq_q, d]`` (the sequences' real positions, concatenated; on the site module's
        device; plus ``"resid@{layer}"``), the logits ``[answer_q, vocab]`` per sequence, and whether the decoder
        layers return tuples.
    """
    layers = spec.layer_modules(model)
    packed: dict[str, torch.Tensor] = {}
    total = sum(len(s) for s in sequences)
    logits: list[torch.Tensor] = []
    tuple_out: list[bool] = []
    probe = layers[0].register_forward_hook(lambda _m, _a, output: tuple_out.append(isinstance(output, tuple)))
    try:
        done = 0
        for start in range(0, len(sequences), group):
            chunk, kept = sequences[start:start + group], scored[start:start + group]
            ids, real = right_padded(chunk)
            index, answer = scored_index(kept, ids.shape[1])
            reads = []
            for i, layer in enumerate(layers):
                for site in sites:
                    reads.append((spec.site_module(model, site, i), site.cached,
                                  _store(packed, _key(site.name, i), real, done, total)))
                if resid:
                    reads.append((layer, "output", _store(packed, _key("resid", i), real, done, total)))
            with hooks(reads), head_gather(model, index, (len(chunk), answer)):
                out = model(input_ids=ids.to(input_device(model)), use_cache=False).logits
            logits += [out[b, :len(k)] for b, k in enumerate(kept)]
            done += len(real)
    finally:
        probe.remove()
    return packed, logits, tuple_out[0]


def _store(packed: dict[str, torch.Tensor], key: str, real: torch.Tensor, start: int, total: int):
    """Hook function writing the real positions of a ``[batch, width, d]`` activation into rows
    ``start .. start + len(real)`` of ``packed[key]``, a ``[total, d]`` tensor allocated at the first write (so the
    packed cache is never held twice)."""
    moved: dict[torch.device, torch.Tensor] = {}

    def keep(value: torch.Tensor) -> None:
        flat = value.detach().reshape(-1, value.shape[-1])
        index = moved.setdefault(flat.device, real.to(flat.device))
        if key not in packed:
            packed[key] = flat.new_empty(total, flat.shape[-1])
        packed[key][start:start + len(real)] = flat.index_select(0, index)
    return keep


# ------------------------------------------------------------------------------------------------ rows and plans

@dataclass(frozen=True)
class Row:
    """One restoration of one question: ``component`` in layers ``window`` at ``positions`` of question
    ``question``'s sequence."""

    question: int
    component: Component
    window: Window
    positions: Bool[torch.Tensor, "seq"]

    @property
    def first_layer(self) -> int:
        """The lowest restored layer (-1 when nothing is restored)."""
        return self.window[0] if self.window[1] > self.window[0] and bool(self.positions.any()) else -1

    def start_layer(self, n_layers: int) -> int:
        """The lowest layer a forward pass of this row runs: its first restored layer, or the top layer
        ``n_layers - 1`` when nothing is restored."""
        first = self.first_layer
        return n_layers - 1 if first < 0 else first


def plan_batches(rows: Sequence[Row], lengths: Sequence[int], n_layers: int, batch_size: int, *,
                 max_extra: float = 0.1, mix_layers: bool = True) -> list[list[int]]:
    """Row indices cut into batches, across questions, so each forward pass starts as high as its rows allow, pads
    little, and is as large as that allows.

    Rows are sorted by first restored layer, then by length (longest first). A batch holds at most ``batch_size``
    rows and takes the next row only while the work it runs (rows x longest x layers from its lowest first layer)
    stays within ``1 + max_extra`` times the least its rows need (each row's own length x layers from its own first
    restored layer). So the whole plan's work ratio (:func:`layer_work`) is at most ``1 + max_extra``; within that
    budget, rows of neighbouring first layers share passes (larger matrix products, fewer passes: faster on a GPU);
    with ``mix_layers=False`` a batch holds one first layer only (on a CPU, compute-bound, every extra layer costs
    its time). Rows that restore nothing run only the top layer.
    """
    first = [row.start_layer(n_layers) for row in rows]
    order = sorted(range(len(rows)), key=lambda r: (first[r], -lengths[rows[r].question], rows[r].question, r))
    batches: list[list[int]] = []
    longest = least = 0
    for r in order:
        n, need = lengths[rows[r].question], lengths[rows[r].question] * (n_layers - first[r])
        if batches and len(batches[-1]) < batch_size and (mix_layers or first[batches[-1][0]] == first[r]):
            batch = batches[-1]
            runs = (len(batch) + 1) * max(longest, n) * (n_layers - first[batch[0]])
            if runs <= (1 + max_extra) * (least + need):
                batch.append(r)
                longest, least = max(longest, n), least + need
                continue
        batches.append([r])
        longest, least = n, need
    return batches


def layer_work(rows: Sequence[Row], batches: Sequence[Sequence[int]], lengths: Sequence[int], n_layers: int
               ) -> tuple[int, int]:
    """``(executed, minimum)`` layer-token counts of a plan: the decoder-layer token positions the batches run
    (rows x padded length x layers from the batch's start), and the least any plan could run (each row's own
    length x layers from its own first restored layer). Their ratio is the plan's hardware-independent overhead."""
    start = [row.start_layer(n_layers) for row in rows]
    executed = sum(len(b) * max(lengths[rows[r].question] for r in b) * (n_layers - min(start[r] for r in b))
                   for b in batches)
    minimum = sum(lengths[row.question] * (n_layers - start[i]) for i, row in enumerate(rows))
    return executed, minimum


# ------------------------------------------------------------------------------------------------ one batch

@dataclass
class _SiteIndex:
    """Where one site is restored in one layer of a batch: flat destination ``row * seq + pos`` indices into the
    batch, flat source indices into the packed store, and for per-head sites the head mask of each (row, position)
    pair."""

    dst: torch.Tensor
    src: torch.Tensor
    heads: torch.Tensor | None = None


def _batch_indices(store: PatchStore, rows: Sequence[Row], width: int, start: int, n_head: int,
                   device_of: Any) -> dict[tuple[int, str], _SiteIndex]:
    """The :class:`_SiteIndex` of every (layer, site) restored in a batch, built on the host and moved once."""
    offsets = store.offsets
    parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, frozenset[int] | None]]] = {}
    for b, row in enumerate(rows):
        pos = row.positions.nonzero().flatten()
        if not len(pos):
            continue
        dst, src = b * width + pos, offsets[row.question] + pos
        for layer in range(max(row.window[0], start), row.window[1]):
            for site in row.component.sites:
                parts.setdefault((layer, site), []).append((dst, src, row.component.heads))
    out = {}
    for (layer, site_name), items in parts.items():
        site = store.spec.site(site_name)
        device = device_of(layer, site)
        dst = torch.cat([d for d, _, _ in items]).to(device, non_blocking=True)
        src = torch.cat([s for _, s, _ in items]).to(device, non_blocking=True)
        heads = None
        if site.rule.heads:
            masks = [head_mask(h, n_head).expand(len(d), n_head) for d, _, h in items]
            heads = torch.cat(masks).to(device, non_blocking=True)
        out[(layer, site_name)] = _SiteIndex(dst, src, heads)
    return out


def _kind_hook(kind: RestoreKind, module: nn.Module, values: torch.Tensor | None, index: _SiteIndex,
               params: dict[str, torch.Tensor] | None, own: dict[str, torch.Tensor] | None, inplace: bool):
    """Hook function applying ``kind`` at the ``dst`` (row, position) pairs of a ``[rows, seq, d]`` tensor: a
    :class:`~patchlab.patching.restore.Restoration` of the gathered rows (source ``values[src]``), its result
    written back with ``index_copy``. Kinds that recompute hook the module's output and also get its input."""
    def restoration(flat: torch.Tensor, inp: torch.Tensor | None) -> Restoration:
        return Restoration(current=flat.index_select(0, index.dst),
                           source=None if values is None else values.index_select(0, index.src),
                           input=None if inp is None else inp.reshape(-1, inp.shape[-1]).index_select(0, index.dst),
                           module=module, source_params=params, target_params=own, heads=index.heads)

    if kind.recomputes:
        def recompute(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
            flat = out.reshape(-1, out.shape[-1])
            flat.index_copy_(0, index.dst, kind.apply(restoration(flat, inp)).to(out.dtype))
            return out
        return recompute

    def rewrite(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        new = kind.apply(restoration(flat, None)).to(x.dtype)
        if inplace and x.is_contiguous():
            flat.index_copy_(0, index.dst, new)
            return x
        return flat.index_copy(0, index.dst, new).view(x.shape)
    return rewrite


@contextlib.contextmanager
def skip_layers(layers: Sequence[nn.Module], output: Any) -> Iterator[None]:
    """While active, each of ``layers`` returns ``output`` without computing anything (its ``forward`` is
    swapped, Accelerate's dispatch wrapper included, and put back on exit)."""
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _restoration_hooks(target: PreTrainedModel, store: PatchStore, index: dict[tuple[int, str], _SiteIndex]
                       ) -> list[tuple[nn.Module, str, Any, bool]]:
    """``(module, point, fn, with_input)`` (:func:`patchlab.pair.sites.hooks`) for every restored (layer, site) of
    a batch, in layer order."""
    out = []
    for (layer, name), idx in sorted(index.items(), key=lambda item: item[0][0]):
        site = store.spec.site(name)
        kind = restore_kind(site.restore)
        module = store.spec.site_module(target, site, layer)
        values = None if site.cached is None else store.source[_key(name, layer)]
        params = store.source_weights.params(site, layer, idx.dst.device) if kind.recomputes else None
        own = site_params(target, store.spec, site, layer) if kind.heads else None
        out.append((module, site.point, _kind_hook(kind, module, values, idx, params, own, site.point == "output"),
                    kind.recomputes))
    return out


def _skipped_input(store: PatchStore, rows: Sequence[Row], real: Int[torch.Tensor, "tokens"], width: int, layer: int,
                   device: torch.device) -> Any:
    """The target's residual stream after ``layer`` for every row of a batch, ``[rows, width, d]`` (zero padding),
    in the structure the decoder layers return; ``real`` is the flat index of the rows' real tokens
    (:func:`right_padded`)."""
    packed = store.target_resid[layer]
    out = torch.zeros(len(rows), width, packed.shape[-1], dtype=packed.dtype, device=device)
    offsets = store.offsets
    src = torch.cat([offsets[r.question] + torch.arange(len(store.ids[r.question])) for r in rows])
    values = packed.index_select(0, src.to(packed.device)).to(device)
    out.view(-1, out.shape[-1]).index_copy_(0, real.to(device), values)
    return (out,) if store.resid_tuple else out


@torch.no_grad()
def head_logits(model: PreTrainedModel, spec: ArchSpec, hidden: Float[torch.Tensor, "rows answer d_model"],
                resid_tuple: bool, where: Placement) -> Float[torch.Tensor, "rows answer vocab"]:
    """The model's logits for final hidden states ``hidden`` (after the final norm, as the LM head receives them),
    with whatever the family applies after its head (soft-capping, scaling) included: a forward pass in which every
    decoder layer is skipped and the head's input is replaced by ``hidden``. ``resid_tuple``: whether the decoder
    layers return tuples (:attr:`PatchStore.resid_tuple`)."""
    layers = spec.layer_modules(model)
    head = model.get_output_embeddings()
    ids = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=where(model.get_input_embeddings()))
    skipped = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype, device=where(layers[0]))
    with skip_layers(list(layers), (skipped,) if resid_tuple else skipped), \
            hook(head, "input", lambda _x: hidden.to(where(head))):
        return model(input_ids=ids, use_cache=False).logits


def _score_rows(store: PatchStore, rows: Sequence[Row], logits: Float[torch.Tensor, "rows answer vocab"],
                metric: Metric, scores: Float[torch.Tensor, "row"], offset: int = 0) -> None:
    """Write the metric of ``rows`` (their restored ``logits``) into ``scores[offset:offset + len(rows)]``, one
    metric call per question."""
    by_question: dict[int, list[int]] = {}
    for b, r in enumerate(rows):
        by_question.setdefault(r.question, []).append(b)
    for q, members in by_question.items():
        picked = torch.tensor(members, device=logits.device)
        restored = logits.index_select(0, picked)[:, :store.answer_lens[q]]
        scores.index_copy_(0, picked + offset, metric(restored, store.refs[q].to(logits.device)))


@torch.no_grad()
def run_batch(target: PreTrainedModel, store: PatchStore, rows: Sequence[Row], metric: Metric, *,
              restore: bool = True, where: Placement | None = None,
              max_logits_bytes: int | None = None) -> Float[torch.Tensor, "row"]:
    """The metric of each row of one batch, on the device of the LM head (no host synchronisation).

    ``restore=False`` runs the same forward pass (same rows, first layer, padding and scored positions) without
    writing any source value: the plain-forward baseline the speed benchmark compares with. ``where``: the
    target's :func:`placement`, to share between batches (default: looked up for this batch).
    ``max_logits_bytes``: when the batch's float32 logits ``[rows, answer, vocab]`` would exceed it, the pass stops
    at the LM head and the head and the metric run on :func:`logit_rows` rows at a time (:func:`head_logits`);
    ``None``: all rows at once."""
    where = where or placement(target)
    spec = store.spec
    layers = spec.layer_modules(target)
    start = min(r.start_layer(len(layers)) for r in rows)
    heads = n_heads(target) if any(spec.site(s).rule.heads for r in rows for s in r.component.sites) else 1
    ids, real = right_padded([store.ids[r.question] for r in rows])
    width = ids.shape[1]
    index = _batch_indices(store, rows, width, start, heads,
                           lambda layer, site: where(spec.site_module(target, site, layer)))
    scored, answer = scored_index([store.scored_positions(r.question) for r in rows], width)
    head = target.get_output_embeddings()
    per_pass = logit_rows(len(rows), answer, vocab_size(target), max_logits_bytes)
    with contextlib.ExitStack() as stack:
        if start > 0:
            h = _skipped_input(store, rows, real, width, start - 1, where(layers[start]))
            stack.enter_context(skip_layers(list(layers[:start]), h))
        if restore:
            stack.enter_context(hooks(_restoration_hooks(target, store, index)))
        stack.enter_context(head_gather(target, scored, (len(rows), answer), where(head)))
        if per_pass < len(rows):
            stack.enter_context(hook(head, "input", _stop_with))
        try:
            logits = target(input_ids=ids.to(where(target.get_input_embeddings()), non_blocking=True),
                            use_cache=False).logits
        except StopForward as stop:
            hidden = stop.args[0]
    scores = torch.empty(len(rows), dtype=torch.float32, device=where(head))
    if per_pass >= len(rows):
        _score_rows(store, rows, logits, metric, scores)
        return scores
    for first in range(0, len(rows), per_pass):
        part = rows[first:first + per_pass]
        _score_rows(store, part, head_logits(target, spec, hidden[first:first + per_pass], store.resid_tuple, where),
                    metric, scores, first)
    return scores


def _stop_with(hidden: torch.Tensor) -> None:
    """Hook function ending the forward pass at the LM head's input, carrying it (``StopForward(hidden)``)."""
    raise StopForward(hidden)


def run_rows(target: PreTrainedModel, store: PatchStore, rows: Sequence[Row], metric: Metric, *,
             batch_size: int = 64, progress: bool = False, desc: str = "patching", restore: bool = True,
             mix_layers: bool | None = None, max_logits_bytes: int | None = None) -> Float[torch.Tensor, "row"]:
    """The metric of every row, at most ``batch_size`` rows per forward pass (:func:`plan_batches`; rows of
    neighbouring first layers share passes on accelerators, not on the CPU), returned on the CPU; the
    device results are copied to the host once, after the last batch (``restore``: see :func:`run_batch`;
    ``mix_layers``: see :func:`plan_batches`, default: on accelerators only; ``max_logits_bytes``: the most float32
    logits one pass holds, see :func:`run_batch`).

    Raises:
        NonFiniteError: a score is NaN or infinite (NaN activations).
    """
    if batch_size < 1:
        raise PatchlabValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in store.ids]
    where = placement(target)
    mix = where(target.get_input_embeddings()).type != "cpu" if mix_layers is None else mix_layers
    batches = plan_batches(rows, lengths, len(store.spec.layer_modules(target)), batch_size, mix_layers=mix)
    results = []
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        results.append((batch, run_batch(target, store, [rows[r] for r in batch], metric, restore=restore,
                                         where=where, max_logits_bytes=max_logits_bytes)))
    scores = torch.empty(len(rows), dtype=torch.float32)
    for batch, values in results:
        scores[batch] = values.cpu()
    if not torch.isfinite(scores).all():
        raise NonFiniteError("restored logits contain NaN or infinite values")
    return scores
