"""Restoring pieces of the vanilla computation inside the unlearned model (activation patching and
parameter restoration, Hong et al. section 3).

Sites, named after TransformerLens hooks and located per family by :mod:`patchlab.pair.arch`:

* ``coef``  - ``blocks.{i}.mlp.hook_post``: input of the MLP down projection, ``[batch, seq, d_mlp]``;
  restored by overwriting it with the vanilla activation.
* ``value`` - the down projection weight (and bias): restored by computing the down projection's output
  with the vanilla parameters on the (possibly restored) input - no state dict is copied.
* ``attn``  - ``blocks.{i}.hook_attn_out``: output of the attention output projection, ``[batch, seq, d_model]``;
  restored by overwriting it with the vanilla activation.

A *component* is one site or a ``+``-joined combination (``"coef+attn"``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import nn

from patchlab.pair.arch import ArchSpec
from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.patching.windows import Window

SITES = ("coef", "value", "attn")
POSITIONS = ("all", "answer", "last_prompt")


def parse_component(component: str | Iterable[str]) -> frozenset[str]:
    """Sites of a component: a name such as ``"coef"`` or ``"coef+attn"``, or an iterable of site names
    (``{"coef", "attn"}``).

    Raises:
        PatchlabValueError: empty name or set, a part that is not one of ``coef``, ``value``, ``attn``, or an
            argument that is neither a string nor an iterable.
    """
    if isinstance(component, str):
        parts = frozenset(p.strip() for p in component.split("+"))
        if not component or not parts <= set(SITES):
            raise PatchlabValueError(f"unknown component {component!r}: use {', '.join(SITES)} or a '+' combination")
        return parts
    try:
        parts = frozenset(component)
    except TypeError as err:
        raise PatchlabValueError(f"sites must be a component name or an iterable of {SITES}, "
                                 f"got {component!r}") from err
    bad = sorted(str(p) for p in parts if p not in SITES)
    if not parts or bad:
        raise PatchlabValueError(f"unknown or no sites {bad or '[]'}: use a non-empty subset of {SITES}")
    return parts


def position_mask(positions: str, prompt_len: int, total_len: int) -> Bool[torch.Tensor, "seq"]:
    """Which sequence positions are restored.

    ``"all"``: every position (the paper). ``"answer"``: the answer tokens' positions ``prompt_len..total_len-1``.
    ``"last_prompt"``: only the last prompt position ``prompt_len-1`` (the one predicting the first answer token).
    """
    if positions not in POSITIONS:
        raise PatchlabValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not 0 < prompt_len <= total_len:
        raise PatchlabValueError(f"prompt length {prompt_len} must be in 1..{total_len}")
    mask = torch.zeros(total_len, dtype=torch.bool)
    if positions == "all":
        mask[:] = True
    elif positions == "answer":
        mask[prompt_len:] = True
    else:
        mask[prompt_len - 1] = True
    return mask


def _submodule(envoy, path: str):
    return functools.reduce(getattr, path.split("."), envoy)


def _layers(pair: ModelPair, which: str):
    return _submodule(getattr(pair, which), pair.arch.layers)


class ActivationCache(dict):
    """Activations of one forward pass keyed by TransformerLens-style hook names.

    Keys: ``blocks.{i}.hook_attn_out`` ``[batch, seq, d_model]`` (the output of the attention output projection,
    before any post-attention norm: TransformerLens 4's ``blocks.{i}.attn.o.hook_out``, which in pre-norm families
    is also its ``hook_attn_out``), ``blocks.{i}.mlp.hook_post`` ``[batch, seq, d_mlp]``,
    ``blocks.{i}.hook_resid_post`` (the decoder layer's output) for every layer ``i``, and ``logits``
    ``[batch, seq, vocab]``.
    """

    def attn(self, layer: int) -> Float[torch.Tensor, "batch seq d_model"]:
        return self[f"blocks.{layer}.hook_attn_out"]

    def coef(self, layer: int) -> Float[torch.Tensor, "batch seq d_mlp"]:
        return self[f"blocks.{layer}.mlp.hook_post"]

    def resid_post(self, layer: int) -> Any:
        """The output of decoder layer ``layer`` as the layer returns it (a tensor, or a tuple for some families)."""
        return self[f"blocks.{layer}.hook_resid_post"]


@torch.no_grad()
def run_with_cache(pair: ModelPair, ids: Int[torch.Tensor, "batch seq"], *, which: str = "vanilla") -> ActivationCache:
    """Run ``pair.vanilla`` (or ``pair.unlearned``) on ``ids`` and cache every layer's coef and attn sites."""
    arch, n_layers = pair.arch, pair.n_layers
    model = getattr(pair, which)
    layers = _layers(pair, which)
    with model.trace(ids.to(pair.device)):
        cache = nnsight.save(ActivationCache())
        for i in range(n_layers):
            cache[f"blocks.{i}.hook_attn_out"] = _submodule(layers[i], arch.attn_out).output
            cache[f"blocks.{i}.mlp.hook_post"] = _submodule(layers[i], arch.mlp_down).input
            cache[f"blocks.{i}.hook_resid_post"] = layers[i].output
        cache["logits"] = model.output.logits
    logits = cache["logits"]
    check_finite(logits, f"{which} logits")
    return cache


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds a NaN or an infinity."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{what} contain NaN or infinite values")


@dataclass(frozen=True)
class Restoration:
    """One restoration: which sites, in which layers, at which positions."""

    sites: frozenset[str]
    layers: Window
    positions: Bool[torch.Tensor, "seq"]


@dataclass(frozen=True)
class SiteMasks:
    """Per-row restoration masks for a batch of restorations of one sequence: ``[layer, row, seq]`` each."""

    coef: Bool[torch.Tensor, "layer row seq"]
    value: Bool[torch.Tensor, "layer row seq"]
    attn: Bool[torch.Tensor, "layer row seq"]

    @classmethod
    def build(cls, restorations: Sequence[Restoration], n_layers: int) -> SiteMasks:
        seq = len(restorations[0].positions)
        masks = {s: torch.zeros(n_layers, len(restorations), seq, dtype=torch.bool) for s in SITES}
        for row, r in enumerate(restorations):
            for site in r.sites:
                masks[site][r.layers[0]:r.layers[1], row] = r.positions
        return cls(**masks)


def value_output(spec: ArchSpec, model: nn.Module, layer: int, x: Float[torch.Tensor, "*batch d_mlp"]
                 ) -> Float[torch.Tensor, "*batch d_model"]:
    """The MLP down projection of ``model``'s ``layer`` applied to the coefficients ``x``, ``x @ W.T + b``,
    computed with its weight and bias (cast to ``x``'s device and dtype; no copy when they already match).

    Restoring ``value`` is this with the vanilla model on the (possibly restored) coefficients of the unlearned
    run; ``spec`` locates the projection (GPT-2's ``Conv1D`` weight is transposed to the ``nn.Linear`` layout).

    Raises:
        PatchlabValueError: ``layer`` is not a layer index of ``model``.
    """
    n_layers = len(spec.layer_modules(model))
    if not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise PatchlabValueError(f"layer must be an int in 0..{n_layers - 1}, got {layer!r}")
    weight = spec.value_weight(model, layer).to(device=x.device, dtype=x.dtype)
    bias = getattr(spec.down_proj(model, layer), "bias", None)
    return F.linear(x, weight, None if bias is None else bias.to(device=x.device, dtype=x.dtype))


def _expand_rows(output: Any, rows: int) -> Any:
    """A cached layer output (batch 1) repeated over ``rows`` batch rows, keeping its structure."""
    if isinstance(output, tuple):
        return (output[0].expand(rows, *output[0].shape[1:]),) + output[1:]
    return output.expand(rows, *output.shape[1:])


def _forward_kwargs(pair: ModelPair, keep_last: int | None) -> dict[str, int]:
    """``logits_to_keep`` for models whose forward accepts it (logits only for the last positions)."""
    if keep_last is None or "logits_to_keep" not in inspect.signature(pair.unlearned_hf.forward).parameters:
        return {}
    return {"logits_to_keep": keep_last}


@torch.no_grad()
def batched_restore(pair: ModelPair, ids: Int[torch.Tensor, "seq"], cache: ActivationCache,
                    restorations: Sequence[Restoration], *, unlearned_cache: ActivationCache | None = None,
                    keep_last: int | None = None) -> Float[torch.Tensor, "row kept vocab"]:
    """Logits of the unlearned model on ``ids`` under each restoration, all in one forward pass.

    Row ``r`` of the batch is ``ids`` under ``restorations[r]``; per-row, per-layer, per-position masks select
    where vanilla activations (from ``cache``, computed on the same ``ids``) replace the unlearned ones.

    Args:
        unlearned_cache: the unlearned model's own cache on ``ids`` (:func:`run_with_cache`). When given, the
            layers below the lowest restored layer of the batch are not run: their outputs are taken from it
            (exact, since nothing differs there).
        keep_last: compute logits only for the last ``keep_last`` positions (when the model supports it).

    Returns:
        ``[rows, seq, vocab]`` logits, or ``[rows, keep_last, vocab]``.
    """
    arch, n_layers, rows = pair.arch, pair.n_layers, len(restorations)
    masks = SiteMasks.build(restorations, n_layers)
    touched = [i for i in range(n_layers) if masks.coef[i].any() or masks.value[i].any() or masks.attn[i].any()]
    skip_below = touched[0] if (touched and unlearned_cache is not None) else 0
    batch = ids[None].expand(rows, -1).to(pair.device)
    layers = _layers(pair, "unlearned")
    with pair.unlearned.trace(batch, **_forward_kwargs(pair, keep_last)):
        for i in range(skip_below):
            layers[i].skip(_expand_rows(unlearned_cache.resid_post(i), rows))
        for i in range(skip_below, n_layers):
            attn_mask = masks.attn[i].to(pair.device)[..., None]
            coef_mask = masks.coef[i].to(pair.device)[..., None]
            value_mask = masks.value[i].to(pair.device)[..., None]
            if masks.attn[i].any():
                site = _submodule(layers[i], arch.attn_out)
                site.output = torch.where(attn_mask, cache.attn(i), site.output)
            if masks.coef[i].any() or masks.value[i].any():
                down = _submodule(layers[i], arch.mlp_down)
                x = torch.where(coef_mask, cache.coef(i), down.input)
                if masks.coef[i].any():
                    down.input = x
                if masks.value[i].any():
                    # only the rows that restore value vectors here pay for the extra projection
                    rows_v = masks.value[i].any(dim=-1).nonzero().flatten().to(pair.device)
                    out = down.output.clone()
                    restored = value_output(arch, pair.vanilla_hf, i, x[rows_v])
                    out[rows_v] = torch.where(value_mask[rows_v], restored, out[rows_v])
                    down.output = out
        logits = nnsight.save(pair.unlearned.output.logits)
    return logits


@torch.no_grad()
def restore(pair: ModelPair, ids: Int[torch.Tensor, "seq"], sites: str | Iterable[str], layers: Window,
            positions: Bool[torch.Tensor, "seq"]) -> Float[torch.Tensor, "1 seq vocab"]:
    """Logits of the unlearned model on ``ids`` with ``sites`` (a component or site names, see
    :func:`parse_component`) restored in ``layers`` at ``positions``.

    The plain path, one restoration at a time as in the paper's scripts: run the vanilla model on ``ids``,
    then the unlearned model with the vanilla values written in place into the chosen layers and positions.

    Raises:
        PatchlabValueError: unknown or no sites.
    """
    arch, sites = pair.arch, parse_component(sites)
    vanilla = run_with_cache(pair, ids[None], which="vanilla")
    pos = positions.nonzero().flatten().to(pair.device)
    layer_envoys = _layers(pair, "unlearned")
    with pair.unlearned.trace(ids[None].to(pair.device)):
        for i in range(*layers):
            if "attn" in sites:
                _submodule(layer_envoys[i], arch.attn_out).output[:, pos] = vanilla.attn(i)[:, pos]
            down = _submodule(layer_envoys[i], arch.mlp_down)
            if "coef" in sites:
                down.input[:, pos] = vanilla.coef(i)[:, pos]
            if "value" in sites:
                down.output[:, pos] = value_output(arch, pair.vanilla_hf, i, down.input[:, pos])
        logits = nnsight.save(pair.unlearned.output.logits)
    return logits
