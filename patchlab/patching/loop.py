"""The plain path, with nnsight: activation caches of a traced model, and one restoration at a time, as in the
paper's scripts (a vanilla forward pass, then a patched forward pass writing the vanilla values in place).

Both iterate the family's site table, touching each layer's site modules in the order the model runs them
(:func:`site_order`, nnsight's rule). Restorations apply the same registered restore kinds
(:mod:`patchlab.patching.restore`) as the batched engine (:mod:`patchlab.patching.engine`), one nnsight forward
pass each instead of batched index writes in torch hooks; the tests hold the two equal.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import nnsight
import torch
from jaxtyping import Bool, Float, Int
from transformers import PreTrainedModel

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.arch import ArchSpec, n_heads
from patchlab.pair.loading import ModelPair
from patchlab.pair.sites import Component, Site, _replace_first, first, parse_component, submodule
from patchlab.pair.placement import input_device
from patchlab.pair.weights import ModelWeights, site_params
from patchlab.patching.engine import WeightSource
from patchlab.patching.restore import Restoration, head_mask, restore_kind
from patchlab.patching.windows import Window


class ActivationCache(dict):
    """Activations of one forward pass, keyed ``"{site}@{layer}"`` (``"coef@3"``, ``"attn@3"``, ``"resid@3"``) plus
    ``"logits"`` ``[batch, seq, vocab]``.

    Each entry is the site's cached point (:attr:`patchlab.Site.cached`): the input of the MLP down projection
    for ``coef`` ``[batch, seq, d_mlp]``, the output of the attention output projection for ``attn`` (before any
    post-attention norm), the input of that projection for ``heads`` ``[batch, seq, n_heads * head_dim]``, the MLP
    block's output for ``mlp_out`` and the decoder layer's output for ``resid`` ``[batch, seq, d_model]``. The keys
    are patchlab's own on purpose: TransformerLens's ``blocks.{i}.hook_attn_out`` is the *normed* attention output
    in post-norm families (OLMo-2, Gemma-2); :func:`patchlab.patching.lens.tl_hook_name` maps sites to TransformerLens hooks.
    """

    def site(self, name: str, layer: int) -> torch.Tensor:
        """The activation of site ``name`` in ``layer``."""
        key = f"{name}@{layer}"
        if key not in self:
            raise PatchlabValueError(f"the cache holds no {key!r}; it has {', '.join(sorted(self)[:6])}...")
        return self[key]

    def attn(self, layer: int) -> Float[torch.Tensor, "batch seq d_model"]:
        return self.site("attn", layer)

    def coef(self, layer: int) -> Float[torch.Tensor, "batch seq d_mlp"]:
        return self.site("coef", layer)

    def resid_post(self, layer: int) -> Float[torch.Tensor, "batch seq d_model"]:
        return self.site("resid", layer)


def _envoy(envoy: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), envoy) if path else envoy


def _layer_envoys(pair: ModelPair, which: str) -> Any:
    return _envoy(getattr(pair, which), pair.arch.layers)


_ORDERS: dict[tuple[str, ArchSpec], list[tuple[str, str]]] = {}


def site_order(model: PreTrainedModel, spec: ArchSpec) -> list[tuple[str, str]]:
    """``(module path, point)`` events of the site modules of a decoder layer, in the order the model runs them
    (read once per family and site table by hooking layer 0 during a two-token forward pass)."""
    key = (model.config.model_type, spec)
    if key not in _ORDERS:
        _ORDERS[key] = _probe_order(model, spec)
    return _ORDERS[key]


def _probe_order(model: PreTrainedModel, spec: ArchSpec) -> list[tuple[str, str]]:
    layer = spec.layer_modules(model)[0]
    paths = list(dict.fromkeys(s.module for s in spec.sites))
    seen: list[tuple[str, str]] = []
    handles = []
    for path in paths:
        module = submodule(layer, path)
        handles.append(module.register_forward_pre_hook(lambda *_a, p=path: seen.append((p, "input"))))
        handles.append(module.register_forward_hook(lambda *_a, p=path: seen.append((p, "output"))))
    try:
        device = input_device(model)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(seen))


def _events(spec: ArchSpec, order: Sequence[tuple[str, str]], sites: Iterable[Site]) -> list[tuple[str, str]]:
    """The events touched in a layer for ``sites``, in execution order."""
    wanted = set()
    for site in sites:
        if site.rule.recomputes:
            wanted |= {(site.module, "input"), (site.module, "output")}
        else:
            wanted.add((site.module, site.point))
    return [e for e in order if e in wanted]


@torch.no_grad()
def run_with_cache(pair: ModelPair, ids: Int[torch.Tensor, "batch seq"], *, which: str = "vanilla",
                   sites: Iterable[str] | None = None) -> ActivationCache:
    """Run ``pair.vanilla`` (or ``pair.unlearned``) on ``ids`` with nnsight and cache every layer's sites.

    Args:
        sites: site names to cache (default: every site of the family's table).

    Raises:
        PatchlabValueError: unknown site or ``which``.
        NonFiniteError: the logits hold NaN or infinity.
    """
    if which not in ("vanilla", "unlearned"):
        raise PatchlabValueError(f"which must be 'vanilla' or 'unlearned', got {which!r}")
    spec = pair.arch
    chosen = [spec.site(s) for s in (sites if sites is not None else spec.site_names)]
    model = getattr(pair, which)
    hf = getattr(pair, f"{which}_hf")
    order = site_order(hf, spec)
    events = _events(spec, order, chosen)
    layers = _layer_envoys(pair, which)
    with model.trace(ids.to(input_device(hf))):
        cache = nnsight.save(ActivationCache())
        for i in range(pair.n_layers):
            for path, point in events:
                value = getattr(_envoy(layers[i], path), point)
                for site in chosen:
                    if (site.module, site.cached) == (path, point):
                        cache[f"{site.name}@{i}"] = first(value)
        cache["logits"] = model.output.logits
    if not torch.isfinite(cache["logits"]).all():
        raise NonFiniteError(f"{which} logits contain NaN or infinite values")
    return cache


@torch.no_grad()
def restore(pair: ModelPair, ids: Int[torch.Tensor, "seq"], component: str | Iterable[str] | Component,
            layers: Window, positions: Bool[torch.Tensor, "seq"], *,
            source_weights: WeightSource | None = None) -> Float[torch.Tensor, "1 seq vocab"]:
    """Logits of the unlearned model on ``ids`` with the vanilla ``component`` restored in ``layers`` at
    ``positions`` (the plain path: a vanilla forward pass with nnsight, then a patched one).

    Raises:
        PatchlabValueError: unknown or no sites.
    """
    spec = pair.arch
    comp = component if isinstance(component, Component) else parse_component(component, spec.sites)
    sites = [spec.site(s) for s in sorted(comp.sites)]
    weights = source_weights or ModelWeights(pair.vanilla_hf, spec)
    cached = sorted({s.name for s in sites if s.cached is not None})
    vanilla = run_with_cache(pair, ids[None], which="vanilla", sites=cached)
    order = site_order(pair.unlearned_hf, spec)
    events = _events(spec, order, sites)
    pos = positions.nonzero().flatten()
    heads = head_mask(comp.heads, n_heads(pair.unlearned_hf)) if any(s.rule.heads for s in sites) else None
    envoys = _layer_envoys(pair, "unlearned")
    device = input_device(pair.unlearned_hf)

    def restored(site: Site, layer: int, current: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The kind's new value of ``site`` at ``pos`` (``current``: ``[n, d]``; ``x``: the module's input)."""
        kind = restore_kind(site.restore)
        dev = current.device
        module = spec.site_module(pair.unlearned_hf, site, layer)
        own = {k: v.to(dev) for k, v in site_params(pair.unlearned_hf, spec, site, layer).items()} if kind.heads \
            else None
        return kind.apply(Restoration(
            current=current, source=None if site.cached is None else vanilla.site(site.name, layer)[0, pos].to(dev),
            input=x, module=module, source_params=weights.params(site, layer, dev) if kind.recomputes else None,
            target_params=own, heads=None if heads is None else heads.expand(len(pos), -1).to(dev))).to(current.dtype)

    with pair.unlearned.trace(ids[None].to(device)):
        for i in range(*layers):
            inputs: dict[str, Any] = {}
            for path, point in events:
                envoy = _envoy(envoys[i], path)
                here = [s for s in sites if s.module == path and s.point == point]
                if point == "input":
                    x = envoy.input
                    for s in here:
                        x = x.clone()
                        x[0, pos] = restored(s, i, x[0, pos], None)
                        envoy.input = x
                    inputs[path] = x
                    continue
                out = envoy.output
                value = first(out).clone()
                for s in here:
                    x = inputs[path][0, pos] if s.rule.recomputes else None
                    value[0, pos] = restored(s, i, value[0, pos], x)
                envoy.output = _replace_first(out, value)
        logits = nnsight.save(pair.unlearned.output.logits)
    return logits
