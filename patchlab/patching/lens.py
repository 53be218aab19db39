"""Optional TransformerLens 4 adapter: the pair's models as ``TransformerBridge`` objects, and the paper's
restorations as TransformerLens forward hooks.

Needs ``pip install 'transformer-lens>=4.3,<5'`` (imported lazily, on first use: importing it takes seconds).

* :func:`bridge` / :func:`bridge_pair`: a ``TransformerBridge`` over a *deep copy* of a Hugging Face causal LM
  (wrapping a model makes TransformerLens replace its submodules, rename its state-dict keys and switch it to
  eager attention, so the model patchlab traces is never handed over).
* :func:`restore_hooks`: ``fwd_hooks`` that restore any component of vanilla sites over a layer window inside the
  unlearned bridge, the same restorations as :func:`patchlab.patching.loop.restore`::

      bridge_v, bridge_u = patchlab.lens.bridge_pair(pair)
      _, cache_v = bridge_v.run_with_cache(ids)
      hooks = patchlab.lens.restore_hooks(cache_v, "coef+attn", (0, L), vanilla_model=pair.vanilla_hf)
      logits = bridge_u.run_with_hooks(ids, fwd_hooks=hooks)

Sites as TransformerLens hook names: each site of the family's site table (:mod:`patchlab.pair.sites`) is the
``hook_in`` or ``hook_out`` of the bridge component that wraps the site's module, found through the bridge's own
component mapping (:func:`tl_paths`); they hold in every family patchlab registers, including the post-norm
OLMo-2/3 and Gemma-2/3 where TransformerLens's ``blocks.{i}.hook_attn_out`` is the *normalized* attention output,
after ``post_attention_layernorm``. For LLaMA:

* ``coef``  - ``blocks.{i}.mlp.out.hook_in``, the input of the MLP down projection ``[batch, seq, d_mlp]``
  (the same tensor as TransformerLens's ``blocks.{i}.mlp.hook_post``);
* ``attn``  - ``blocks.{i}.attn.o.hook_out``, the output of the attention output projection ``[batch, seq, d_model]``;
* ``value`` - ``blocks.{i}.mlp.out.hook_out``, the output of the down projection, recomputed with the vanilla
  weight and bias on the (possibly restored) coefficients; ``heads`` likewise on ``attn.o``;
* ``mlp_out`` - ``blocks.{i}.mlp.hook_out``; ``resid`` - ``blocks.{i}.hook_out``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import MissingDependencyError, PatchlabValueError, UnsupportedArchitectureError
from patchlab.pair.arch import arch_spec, n_heads
from patchlab.pair.sites import Site, parse_component
from patchlab.pair.weights import site_params
from patchlab.patching.restore import Restoration, RestoreKind, head_mask, restore_kind
from patchlab.patching.loop import ActivationCache, site_order
from patchlab.pair import ModelPair
from patchlab.patching.windows import Window

if TYPE_CHECKING:  # pragma: no cover - typing only; transformer_lens is imported lazily
    from transformer_lens.model_bridge import TransformerBridge

INSTALL_HINT = "pip install 'transformer-lens>=4.3,<5'"

#: A cached activation's layer: TransformerLens's ``blocks.{i}.…`` or patchlab's ``{site}@{i}``.
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.|@(\d+)$")

Hook = tuple[str, Callable[..., torch.Tensor]]


def _bridge_builder() -> Callable[..., Any]:
    """``build_bridge_from_module``, imported on first use."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError as err:
        raise MissingDependencyError(
            f"patchlab.patching.lens needs TransformerLens 4: {INSTALL_HINT} (import failed: {err})") from err
    return build_bridge_from_module


def _known_tl_architectures() -> Mapping[str, Any]:
    """Architecture names TransformerLens has an adapter for (built-in and registered at runtime)."""
    from transformer_lens.factories.architecture_adapter_factory import (SUPPORTED_ARCHITECTURES,
                                                                         ArchitectureAdapterFactory)
    ArchitectureAdapterFactory.discover_entry_points()
    return getattr(ArchitectureAdapterFactory, "_adapters", SUPPORTED_ARCHITECTURES)


def tl_architecture(model: PreTrainedModel) -> str:
    """The TransformerLens architecture name of ``model`` (``"LlamaForCausalLM"``, ``"GPT2LMHeadModel"``...).

    The first of the model's class and base classes, then ``config.architectures``, that TransformerLens knows.

    Raises:
        UnsupportedArchitectureError: TransformerLens has no adapter for the model.
    """
    known = _known_tl_architectures()
    candidates = [cls.__name__ for cls in type(model).__mro__]
    candidates += list(getattr(model.config, "architectures", None) or [])
    for name in candidates:
        if name in known:
            return name
    raise UnsupportedArchitectureError(
        f"TransformerLens has no adapter for {type(model).__name__} (model type {model.config.model_type!r})")


def _bridge_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, dict[str, Any]]:
    """A copy of ``tokenizer`` that TransformerLens accepts offline, and its original ``init_kwargs``.

    TransformerLens reloads a tokenizer from ``init_kwargs["name_or_path"]`` (the hub, or a crash) unless
    ``init_kwargs["add_bos_token"]`` is truthy; that flag is only read there, the encoding does not change.
    """
    tok = copy.deepcopy(tokenizer)
    original = dict(tok.init_kwargs)
    tok.init_kwargs["name_or_path"] = tok.init_kwargs.get("name_or_path") or tok.name_or_path or "local"
    tok.init_kwargs["add_bos_token"] = True
    return tok, original


def bridge(model: PreTrainedModel, *, tokenizer: PreTrainedTokenizerBase | None = None,
           share_weights: bool = False) -> TransformerBridge:
    """A TransformerLens 4 ``TransformerBridge`` over a deep copy of a Hugging Face causal LM.

    Wrapping makes TransformerLens replace submodules and rename state-dict keys of the model it is given, so it
    is given a copy: ``model`` itself is left untouched (same modules, state-dict keys and values) and can still be
    traced by its :class:`~patchlab.ModelPair`. The bridge runs in ``model``'s dtype, on its device, in eval mode;
    ``bridge(ids)`` with ``ids`` ``[batch, seq]`` returns ``[batch, seq, vocab]`` logits equal to
    ``model(ids).logits`` (to float rounding).

    Memory: by default a full copy of the weights (as many bytes again as ``model``). ``share_weights=True``
    copies only the module structure and shares the parameter and buffer tensors with ``model`` (next to no
    extra memory; TransformerLens still creates the tensors it re-lays out, e.g. GPT-2's key and value weights
    split from the fused ``c_attn``). Then treat both as read-only: in-place weight writes through either one
    (``process_weights``, fine-tuning, ``load_state_dict``) reach the other, or only partly.

    Args:
        model: a causal LM of a family patchlab supports (:func:`patchlab.arch_spec`) and TransformerLens bridges.
        tokenizer: attached (as a copy) for ``bridge.to_tokens`` / ``generate``; without it the bridge takes token
            ids only. TransformerLens's ``to_tokens(text)`` prepends BOS by default; patchlab's ids do not carry
            one unless the tokenizer adds it: pass ``prepend_bos=False`` to get the ids ``tokenizer(text)`` gives.
        share_weights: share tensors with ``model`` instead of copying them (see above).

    Raises:
        PatchlabValueError: ``model`` is not a ``PreTrainedModel`` or ``tokenizer`` not a tokenizer.
        UnsupportedArchitectureError: patchlab or TransformerLens does not support the family.
        MissingDependencyError: TransformerLens is not installed.
    """
    if not isinstance(model, PreTrainedModel):
        raise PatchlabValueError(f"bridge needs a transformers PreTrainedModel, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise PatchlabValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    arch_spec(model)
    build = _bridge_builder()
    architecture = tl_architecture(model)
    memo: dict[int, Any] = {}
    if share_weights:
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo).eval()
    tok, init_kwargs = _bridge_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    name = getattr(model.config, "name_or_path", "") or f"patchlab/{architecture}"
    result = build(twin, architecture, hf_config=twin.config, tokenizer=tok, model_name=name)
    if tok is not None:
        tok.init_kwargs.clear()
        tok.init_kwargs.update(init_kwargs)
    return result.eval()


def bridge_pair(pair: ModelPair, *, share_weights: bool = False) -> tuple[TransformerBridge, TransformerBridge]:
    """``(vanilla, unlearned)`` bridges of a :class:`~patchlab.ModelPair`, with the pair's tokenizer attached.

    Memory: two full copies of the weights unless ``share_weights=True`` (see :func:`bridge`).

    Raises:
        PatchlabValueError: ``pair`` is not a ``ModelPair``.
        UnsupportedArchitectureError, MissingDependencyError: as :func:`bridge`.
    """
    if not isinstance(pair, ModelPair):
        raise PatchlabValueError(f"bridge_pair needs a patchlab.ModelPair, got {type(pair).__name__}")
    return (bridge(pair.vanilla_hf, tokenizer=pair.tokenizer, share_weights=share_weights),
            bridge(pair.unlearned_hf, tokenizer=pair.tokenizer, share_weights=share_weights))


def tl_paths(bridge: Any) -> dict[str, str]:
    """Module paths inside a decoder layer (Hugging Face names, ``"self_attn.o_proj"``) -> bridge component paths
    inside a block (``"attn.o"``), from the bridge's architecture adapter; ``""`` (the layer) -> ``""``."""
    adapter = getattr(bridge, "adapter", None)
    blocks = getattr(adapter, "component_mapping", {}).get("blocks") if adapter is not None else None
    if blocks is None:
        raise PatchlabValueError(f"{type(bridge).__name__} is not a TransformerBridge with a block mapping")

    def walk(component: Any, tl_prefix: str, hf_prefix: str) -> dict[str, str]:
        out = {}
        for tl_name, sub in (getattr(component, "submodules", None) or {}).items():
            if sub.name:
                hf, tl = f"{hf_prefix}{sub.name}", f"{tl_prefix}{tl_name}"
                out[hf] = tl
                out.update(walk(sub, tl + ".", hf + "."))
        return out
    return {"": "", **walk(blocks, "", "")}


def tl_hook_name(paths: Mapping[str, str], site: Site, layer: int, point: str) -> str:
    """The TransformerLens hook name of ``site``'s ``point`` (``"input"`` / ``"output"``) in ``layer``."""
    if site.module not in paths:
        raise UnsupportedArchitectureError(
            f"TransformerLens's bridge has no component for {site.module!r} (site {site.name!r}); it bridges "
            f"{', '.join(sorted(p for p in paths if p))}")
    component = paths[site.module]
    return f"blocks.{layer}{'.' + component if component else ''}.{'hook_in' if point == 'input' else 'hook_out'}"


def _cache_layers(cache: Any) -> int:
    """Layer count of a cache: the TransformerLens model's ``cfg.n_layers``, else 1 + the largest block index."""
    n_layers = getattr(getattr(getattr(cache, "model", None), "cfg", None), "n_layers", None)
    if isinstance(n_layers, int):
        return n_layers
    indices = [int(m.group(1) or m.group(2)) for k in cache.keys() if isinstance(k, str) and (m := _LAYER_KEY.search(k))]
    if not indices:
        raise PatchlabValueError("the vanilla cache holds no per-layer activations ('blocks.{i}.*' or '{site}@{i}')")
    return max(indices) + 1


def _check_window(layers: Window, n_layers: int) -> Window:
    ok = (isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(x, int) for x in layers)
          and 0 <= layers[0] <= layers[1] <= n_layers)
    if not ok:
        raise PatchlabValueError(
            f"layer window must be a (start, stop) tuple of ints with 0 <= start <= stop <= {n_layers} "
            f"(the layer count), got {layers!r}")
    return layers


def _cached(cache: Any, key: str) -> Float[torch.Tensor, "batch seq d"]:
    """``cache[key]`` as a ``[batch, seq, d]`` tensor (a batch-less ``[seq, d]`` entry gets batch 1; TransformerLens's
    per-head ``[batch, seq, head, d_head]`` entries are flattened to ``[batch, seq, head * d_head]``)."""
    if key not in cache.keys():
        raise PatchlabValueError(
            f"the vanilla cache has no {key!r}: cache every site (no names_filter that drops it)")
    value = cache[key]
    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3, 4):
        raise PatchlabValueError(f"vanilla cache entry {key!r} must be a [batch, seq, d] tensor")
    value = _joined_heads(value)
    return (value[None] if value.ndim == 2 else value).detach()


def _joined_heads(x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's per-head ``[batch, seq, head, d_head]`` tensors (the output projection's input) as
    ``[batch, seq, head * d_head]``, head-major like HF's concatenated heads; other tensors as they are."""
    return rearrange(x, "batch seq head d_head -> batch seq (head d_head)") if x.ndim == 4 else x


def _check_positions(positions: Bool[torch.Tensor, "seq"] | None, seq: int) -> Bool[torch.Tensor, "seq"]:
    if positions is None:
        return torch.ones(seq, dtype=torch.bool)
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool or positions.shape != (seq,):
        got = (positions.dtype, tuple(positions.shape)) if isinstance(positions, torch.Tensor) else type(positions)
        raise PatchlabValueError(f"positions must be a bool tensor of shape ({seq},) (the cached length), got {got}")
    return positions


def _rows(x: torch.Tensor, batch: int, mask: Bool[torch.Tensor, "seq"]) -> torch.Tensor:
    """The ``mask`` positions of every row of a ``[batch or 1, seq, d]`` tensor as ``[batch * n, d]`` (a batch-1
    tensor is repeated for every row)."""
    return x[:, mask].expand(batch, -1, -1).reshape(-1, x.shape[-1])


def _kind_hook(kind: RestoreKind, source: torch.Tensor | None, mask: Bool[torch.Tensor, "seq"],
               stash: dict[str, torch.Tensor], module: torch.nn.Module | None = None,
               params: dict[str, torch.Tensor] | None = None, heads: torch.Tensor | None = None,
               target_params: dict[str, torch.Tensor] | None = None) -> Callable[..., torch.Tensor]:
    """Hook applying ``kind`` at the ``mask`` positions of a ``[batch, seq, d]`` activation (TransformerLens's
    per-head ``[batch, seq, head, d_head]`` ones as ``[batch, seq, head * d_head]``): the masked rows gathered
    into a :class:`~patchlab.patching.restore.Restoration` (``source``: the vanilla cached value, batch 1 or the
    run's; kinds that recompute also get the module input stashed by the input hook), its result written back."""
    def hook(act: Float[torch.Tensor, "batch seq d"], hook: Any) -> Float[torch.Tensor, "batch seq d"]:
        flat = _joined_heads(act)
        batch, dev = flat.shape[0], act.device
        if flat.shape[1] != len(mask) or source is not None and (
                source.shape[0] not in (1, batch) or source.shape[1] != flat.shape[1]
                or not kind.recomputes and source.shape[-1] != flat.shape[-1]):
            raise PatchlabValueError(
                f"{hook.name}: activation {tuple(flat.shape)} does not match the vanilla one "
                f"{tuple(source.shape) if source is not None else (1, len(mask))}: run the restored model on the ids "
                "the vanilla cache was computed on")
        where = mask.to(dev)
        x = _joined_heads(stash.pop("x")) if kind.recomputes else None
        new = kind.apply(Restoration(
            current=_rows(flat, batch, where),
            source=None if source is None else _rows(source.to(dev), batch, where),
            input=None if x is None else _rows(x, batch, where), module=module,
            source_params=None if params is None else {k: v.to(dev) for k, v in params.items()},
            target_params=None if target_params is None else {k: v.to(dev) for k, v in target_params.items()},
            heads=None if heads is None else heads.to(dev).expand(batch * int(where.sum()), -1)))
        out = flat.clone()
        out[:, where] = new.to(act.dtype).view(batch, -1, flat.shape[-1])
        return out.view(act.shape)
    return hook


def _stash_hook(stash: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Hook keeping a module's (possibly restored) input in ``stash["x"]`` for a kind that recomputes."""
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        stash["x"] = act
        return act
    return hook


def restore_hooks(vanilla_cache: Any, sites: str | Iterable[str], layers: Window,
                  positions: Bool[torch.Tensor, "seq"] | None = None, *, vanilla_model: PreTrainedModel,
                  bridge: Any = None) -> list[Hook]:
    """TransformerLens ``fwd_hooks`` restoring vanilla ``sites`` in ``layers`` at ``positions``.

    The same restoration as :func:`patchlab.patching.loop.restore` (to float rounding), for
    ``bridge_u.run_with_hooks(ids, fwd_hooks=...)`` or ``with bridge_u.hooks(fwd_hooks=...)``, for every site of the
    family's table (a site registered with :func:`patchlab.register_site` included): ``overwrite`` sites replace
    their hook point's activation with the vanilla one; ``recompute`` and ``per_head`` sites replace the output of
    their component with one computed from ``vanilla_model``'s parameters on the (possibly restored) input.

    Args:
        vanilla_cache: the vanilla model's activations on the same ids: a TransformerLens ``ActivationCache``
            (``bridge_v.run_with_cache(ids)``) or a :class:`patchlab.ActivationCache`
            (``patchlab.run_with_cache(pair, ids)``). Entries ``[batch, seq, d]`` with batch 1 (applied to every
            row) or the restored run's batch.
        sites: a component (``"coef+attn"``, ``"heads[0,2]"``) or an iterable of site names.
        layers: half-open layer window ``(start, stop)``; ``(0, 0)`` restores nothing.
        positions: ``[seq]`` bool mask of the restored positions (e.g. :func:`patchlab.patching.sweep.position_mask`);
            ``None``: every position.
        vanilla_model: the vanilla Hugging Face model (``pair.vanilla_hf``): its family's site table, and its
            parameters for ``recompute`` / ``per_head`` sites.
        bridge: the bridge the hooks run on (``bridge_u``): its component mapping names the hooks and its weights
            are the unlearned ones a per-head restoration removes. Default: the cache's own model (a
            TransformerLens cache knows its bridge), which is enough for every site but ``per_head`` ones.

    Returns:
        ``[(hook_name, fn), ...]``, in the order they must be registered. The hooks hold references to the cache.

    Raises:
        PatchlabValueError: unknown site, window outside the model, positions of the wrong shape or dtype, a cache
            without the needed entries, a missing ``vanilla_model`` / ``bridge``, or (when run) ids of another
            length.
        UnsupportedArchitectureError: ``vanilla_model``'s family is not registered, or the bridge does not wrap
            some site's module.
    """
    if not (hasattr(vanilla_cache, "keys") and hasattr(vanilla_cache, "__getitem__")):
        raise PatchlabValueError("vanilla_cache must be an ActivationCache (TransformerLens or patchlab), "
                                 f"got {type(vanilla_cache).__name__}")
    if not isinstance(vanilla_model, PreTrainedModel):
        raise PatchlabValueError("restore_hooks needs vanilla_model=pair.vanilla_hf (its site table and weights)")
    spec = arch_spec(vanilla_model)
    component = parse_component(sites, spec.sites)
    chosen = [spec.site(s) for s in sorted(component.sites)]
    n_layers = len(spec.layer_modules(vanilla_model))
    cached_layers = _cache_layers(vanilla_cache)
    if getattr(vanilla_cache, "model", None) is not None and cached_layers != n_layers:
        raise PatchlabValueError(f"vanilla_model has {n_layers} layers, the vanilla cache {cached_layers}")
    start, stop = _check_window(layers, n_layers)
    source = bridge if bridge is not None else getattr(vanilla_cache, "model", None)
    if source is None:
        raise PatchlabValueError("the cache carries no bridge (a patchlab cache, or a plain dict): pass bridge=bridge_u "
                                 "(for its component names)")
    paths = tl_paths(source)
    ours = isinstance(vanilla_cache, ActivationCache)

    def cached(site: Site, layer: int) -> torch.Tensor:
        key = f"{site.name}@{layer}" if ours else tl_hook_name(paths, site, layer, site.cached)
        return _cached(vanilla_cache, key)

    probe = next((s for s in chosen if s.cached is not None), None)
    seq = cached(probe, min(start, n_layers - 1)).shape[1] if probe is not None else None
    if seq is None:  # only weight sites: read the length from any cached activation
        seq = _cached(vanilla_cache, next(k for k in vanilla_cache.keys() if isinstance(k, str)
                                          and _LAYER_KEY.search(k))).shape[1]
    mask = _check_positions(positions, seq)
    heads = head_mask(component.heads, n_heads(vanilla_model)) if any(s.rule.heads for s in chosen) else None
    order = {event: k for k, event in enumerate(site_order(vanilla_model, spec))}
    hooks: list[Hook] = []
    for i in range(start, stop):
        events = []  # (execution order, rewrites before stashes, hook name, fn)
        for site in chosen:
            kind = restore_kind(site.restore)
            source = None if site.cached is None else cached(site, i)
            stash: dict[str, torch.Tensor] = {}
            if not kind.recomputes:
                events.append((order[(site.module, site.point)], 0, tl_hook_name(paths, site, i, site.point),
                               _kind_hook(kind, source, mask, stash)))
                continue
            events.append((order[(site.module, "input")], 1, tl_hook_name(paths, site, i, "input"),
                           _stash_hook(stash)))
            events.append((order[(site.module, "output")], 1, tl_hook_name(paths, site, i, "output"),
                           _kind_hook(kind, source, mask, stash, spec.site_module(vanilla_model, site, i),
                                      site_params(vanilla_model, spec, site, i), heads if kind.heads else None,
                                      _component_params(bridge, paths, site, i) if kind.heads else None)))
        hooks += [(name, fn) for _, _, name, fn in sorted(events, key=lambda e: e[:2])]
    return _merged(hooks)


def _component_params(bridge: Any, paths: Mapping[str, str], site: Site, layer: int) -> dict[str, torch.Tensor]:
    """The restored bridge's own parameters of ``site``'s module in ``layer`` (a per-head restoration removes the
    unlearned heads' contribution, so it needs the unlearned weights)."""
    if bridge is None:
        raise PatchlabValueError(f"restoring {site.name!r} needs bridge=bridge_u, the bridge the hooks run on "
                                 "(its weights remove the unlearned heads' contribution)")
    component = bridge.blocks[layer].get_submodule(paths[site.module])
    original = getattr(component, "original_component", component)
    return {name: p.detach() for name, p in original.named_parameters(recurse=False)}


def _merged(hooks: list[Hook]) -> list[Hook]:
    """One hook per name: a component's input hook that both overwrites (``coef``) and stashes (``value``) runs the
    overwrite first, then stashes its result."""
    out: dict[str, list[Callable[..., torch.Tensor]]] = {}
    for name, fn in hooks:
        out.setdefault(name, []).append(fn)

    def chain(fns: list[Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
        def run(act: torch.Tensor, hook: Any) -> torch.Tensor:
            for fn in fns:
                act = fn(act, hook)
            return act
        return run
    return [(name, fns[0] if len(fns) == 1 else chain(fns)) for name, fns in out.items()]
