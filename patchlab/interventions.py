"""Restoring pieces of the vanilla computation inside the unlearned model (activation patching and
parameter restoration, Hong et al. section 3).

Sites, named after TransformerLens hooks and located per family by :mod:`patchlab.arch`:

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nnsight
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.windows import Window

SITES = ("coef", "value", "attn")
POSITIONS = ("all", "answer", "last_prompt")


def parse_component(component: str) -> frozenset[str]:
    """Sites of a component name such as ``"coef"`` or ``"coef+attn"``.

    Raises:
        PatchlabValueError: empty name or a part that is not one of ``coef``, ``value``, ``attn``.
    """
    parts = [p.strip() for p in str(component).split("+")]
    bad = [p for p in parts if p not in SITES]
    if not component or bad:
        raise PatchlabValueError(f"unknown component {component!r}: use {', '.join(SITES)} or a '+' combination")
    return frozenset(parts)


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

    Keys: ``blocks.{i}.hook_attn_out`` ``[batch, seq, d_model]``, ``blocks.{i}.mlp.hook_post``
    ``[batch, seq, d_mlp]`` for every layer ``i``, and ``logits`` ``[batch, seq, vocab]``.
    """

    def attn(self, layer: int) -> Float[torch.Tensor, "batch seq d_model"]:
        return self[f"blocks.{layer}.hook_attn_out"]

    def coef(self, layer: int) -> Float[torch.Tensor, "batch seq d_mlp"]:
        return self[f"blocks.{layer}.mlp.hook_post"]


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


def _value_output(pair: ModelPair, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection of ``layer`` applied to ``x`` with the vanilla weight and bias."""
    down = pair.arch.down_proj(pair.vanilla_hf, layer)
    return F.linear(x, pair.arch.value_weight(pair.vanilla_hf, layer), getattr(down, "bias", None))


@torch.no_grad()
def batched_restore(pair: ModelPair, ids: Int[torch.Tensor, "seq"], cache: ActivationCache,
                    restorations: Sequence[Restoration]) -> Float[torch.Tensor, "row seq vocab"]:
    """Logits of the unlearned model on ``ids`` under each restoration, all in one forward pass.

    Row ``r`` of the batch is ``ids`` under ``restorations[r]``; per-row, per-layer, per-position masks select
    where vanilla activations (from ``cache``, computed on the same ``ids``) replace the unlearned ones.
    """
    arch, n_layers = pair.arch, pair.n_layers
    masks = SiteMasks.build(restorations, n_layers)
    batch = ids[None].expand(len(restorations), -1).to(pair.device)
    layers = _layers(pair, "unlearned")
    with pair.unlearned.trace(batch):
        for i in range(n_layers):
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
                    down.output = torch.where(value_mask, _value_output(pair, i, x), down.output)
        logits = nnsight.save(pair.unlearned.output.logits)
    return logits


@torch.no_grad()
def restore(pair: ModelPair, ids: Int[torch.Tensor, "seq"], cache: ActivationCache, sites: Iterable[str],
            layers: Window, positions: Bool[torch.Tensor, "seq"]) -> Float[torch.Tensor, "1 seq vocab"]:
    """Logits of the unlearned model on ``ids`` with ``sites`` restored in ``layers`` at ``positions``.

    The plain one-restoration path: vanilla values are written in place into the unlearned forward pass.
    """
    arch, sites = pair.arch, set(sites)
    pos = positions.nonzero().flatten().to(pair.device)
    layer_envoys = _layers(pair, "unlearned")
    with pair.unlearned.trace(ids[None].to(pair.device)):
        for i in range(*layers):
            if "attn" in sites:
                _submodule(layer_envoys[i], arch.attn_out).output[:, pos] = cache.attn(i)[:, pos]
            down = _submodule(layer_envoys[i], arch.mlp_down)
            if "coef" in sites:
                down.input[:, pos] = cache.coef(i)[:, pos]
            if "value" in sites:
                down.output[:, pos] = _value_output(pair, i, down.input[:, pos])
        logits = nnsight.save(pair.unlearned.output.logits)
    return logits
