"""Optional TransformerLens 4 adapter: the pair's models as ``TransformerBridge`` objects, and the paper's
restorations as TransformerLens forward hooks.

Needs ``pip install 'transformer-lens>=4.3,<5'`` (imported lazily, on first use: importing it takes seconds).

* :func:`bridge` / :func:`bridge_pair`: a ``TransformerBridge`` over a *deep copy* of a Hugging Face causal LM
  (wrapping a model makes TransformerLens replace its submodules, rename its state-dict keys and switch it to
  eager attention, so the model patchlab traces is never handed over).
* :func:`restore_hooks`: ``fwd_hooks`` that restore the vanilla ``coef`` / ``attn`` (and ``value``) sites of a
  layer window inside the unlearned bridge, the same restorations as :func:`patchlab.patching.interventions.restore`::

      bridge_v, bridge_u = patchlab.patching.lens.bridge_pair(pair)
      _, cache_v = bridge_v.run_with_cache(ids)
      logits = bridge_u.run_with_hooks(ids, fwd_hooks=patchlab.patching.lens.restore_hooks(cache_v, "coef+attn", (0, L)))

Sites as TransformerLens hook names (:data:`TL_HOOKS`; they hold in every family patchlab registers, including
the post-norm OLMo-2/3 and Gemma-2/3 where TransformerLens's ``blocks.{i}.hook_attn_out`` is the *normalized*
attention output, after ``post_attention_layernorm``):

* ``coef``  - ``blocks.{i}.mlp.hook_post``, the input of the MLP down projection ``[batch, seq, d_mlp]``;
* ``attn``  - ``blocks.{i}.attn.o.hook_out``, the output of the attention output projection ``[batch, seq, d_model]``;
* ``value`` - ``blocks.{i}.mlp.out.hook_out``, the output of the down projection, recomputed with the vanilla
  weight and bias on the (possibly restored) coefficients.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.errors import MissingDependencyError, PatchlabValueError, UnsupportedArchitectureError
from patchlab.patching.interventions import ActivationCache, parse_component, value_output
from patchlab.pair import ModelPair
from patchlab.patching.windows import Window

if TYPE_CHECKING:  # pragma: no cover - typing only; transformer_lens is imported lazily
    from transformer_lens.model_bridge import TransformerBridge

INSTALL_HINT = "pip install 'transformer-lens>=4.3,<5'"

#: TransformerLens hook name of each site, formatted with ``layer``.
TL_HOOKS: dict[str, str] = {
    "coef": "blocks.{layer}.mlp.hook_post",
    "attn": "blocks.{layer}.attn.o.hook_out",
    "value": "blocks.{layer}.mlp.out.hook_out",
}

#: Keys of the same sites in :class:`patchlab.ActivationCache` (``patchlab.run_with_cache``).
_PATCHLAB_KEYS: dict[str, str] = {
    "coef": "blocks.{layer}.mlp.hook_post",
    "attn": "blocks.{layer}.hook_attn_out",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.")

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


def _cache_layers(cache: Any) -> int:
    """Layer count of a cache: the TransformerLens model's ``cfg.n_layers``, else 1 + the largest block index."""
    n_layers = getattr(getattr(getattr(cache, "model", None), "cfg", None), "n_layers", None)
    if isinstance(n_layers, int):
        return n_layers
    indices = [int(m.group(1)) for k in cache.keys() if isinstance(k, str) and (m := _BLOCK.match(k))]
    if not indices:
        raise PatchlabValueError("the vanilla cache holds no 'blocks.{i}.*' activations")
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
    """``cache[key]`` as a ``[batch, seq, d]`` tensor (a batch-less ``[seq, d]`` entry gets batch 1)."""
    if key not in cache.keys():
        raise PatchlabValueError(
            f"the vanilla cache has no {key!r}: cache every site (no names_filter that drops it)")
    value = cache[key]
    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3):
        raise PatchlabValueError(f"vanilla cache entry {key!r} must be a [batch, seq, d] tensor")
    return (value[None] if value.ndim == 2 else value).detach()


def _check_positions(positions: Bool[torch.Tensor, "seq"] | None, seq: int) -> Bool[torch.Tensor, "seq"]:
    if positions is None:
        return torch.ones(seq, dtype=torch.bool)
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool or positions.shape != (seq,):
        got = (positions.dtype, tuple(positions.shape)) if isinstance(positions, torch.Tensor) else type(positions)
        raise PatchlabValueError(f"positions must be a bool tensor of shape ({seq},) (the cached length), got {got}")
    return positions


def _restore(act: torch.Tensor, new: torch.Tensor, mask: Bool[torch.Tensor, "seq"], name: str) -> torch.Tensor:
    """``act`` with ``new`` written at the ``mask`` positions; ``new`` has batch 1 or ``act``'s batch."""
    if act.shape[-2:] != new.shape[-2:] or new.shape[0] not in (1, act.shape[0]):
        raise PatchlabValueError(
            f"{name}: activation {tuple(act.shape)} does not match the vanilla one {tuple(new.shape)}: run the "
            "restored model on the ids the vanilla cache was computed on")
    return torch.where(mask.to(act.device)[:, None], new.to(device=act.device, dtype=act.dtype), act)


def _overwrite_hook(vanilla: torch.Tensor | None, mask: torch.Tensor, stash: dict[str, torch.Tensor] | None = None
                    ) -> Callable[..., torch.Tensor]:
    """Hook writing ``vanilla`` at the ``mask`` positions (if given) and keeping the result in ``stash["x"]``."""
    def hook(act: Float[torch.Tensor, "batch seq d"], hook: Any) -> Float[torch.Tensor, "batch seq d"]:
        out = act if vanilla is None else _restore(act, vanilla, mask, hook.name)
        if stash is not None:
            stash["x"] = out
        return out
    return hook


def _value_hook(spec: ArchSpec, model: PreTrainedModel, layer: int, mask: torch.Tensor,
                stash: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Hook on ``mlp.out.hook_out``: the down projection of the stashed input with the vanilla weight and bias."""
    def hook(act: Float[torch.Tensor, "batch seq d_model"], hook: Any) -> Float[torch.Tensor, "batch seq d_model"]:
        return _restore(act, value_output(spec, model, layer, stash.pop("x")), mask, hook.name)
    return hook


def restore_hooks(vanilla_cache: Any, sites: str | Iterable[str], layers: Window,
                  positions: Bool[torch.Tensor, "seq"] | None = None, *,
                  vanilla_model: PreTrainedModel | None = None) -> list[Hook]:
    """TransformerLens ``fwd_hooks`` restoring vanilla ``sites`` in ``layers`` at ``positions``.

    The same restoration as :func:`patchlab.patching.interventions.restore` (to float rounding), for
    ``bridge_u.run_with_hooks(ids, fwd_hooks=...)`` or ``with bridge_u.hooks(fwd_hooks=...)``:

    * ``coef``: ``blocks.{i}.mlp.hook_post`` is overwritten with the vanilla activation;
    * ``attn``: ``blocks.{i}.attn.o.hook_out`` is overwritten with the vanilla activation;
    * ``value``: ``blocks.{i}.mlp.out.hook_out`` is replaced by the down projection of the (possibly restored)
      coefficients with ``vanilla_model``'s weight and bias (a weight swap, computed, not copied).

    Args:
        vanilla_cache: the vanilla model's activations on the same ids: a TransformerLens ``ActivationCache``
            (``bridge_v.run_with_cache(ids)``) or a :class:`patchlab.ActivationCache`
            (``patchlab.run_with_cache(pair, ids)``). Entries ``[batch, seq, d]`` with batch 1 (applied to every
            row) or the restored run's batch.
        sites: a component (``"coef+attn"``) or an iterable of sites from ``coef``, ``value``, ``attn``.
        layers: half-open layer window ``(start, stop)``; ``(0, 0)`` restores nothing.
        positions: ``[seq]`` bool mask of the restored positions (e.g. :func:`patchlab.patching.interventions.position_mask`);
            ``None``: every position.
        vanilla_model: the vanilla Hugging Face model (``pair.vanilla_hf``), required for ``value``.

    Returns:
        ``[(hook_name, fn), ...]``, in the order they must be registered. The hooks hold references to the cache.

    Raises:
        PatchlabValueError: unknown site, window outside the model, positions of the wrong shape or dtype, a cache
            without the needed entries, ``value`` without ``vanilla_model``, or (when run) ids of another length.
        UnsupportedArchitectureError: ``vanilla_model``'s family is not registered.
    """
    if not (hasattr(vanilla_cache, "keys") and hasattr(vanilla_cache, "__getitem__")):
        raise PatchlabValueError("vanilla_cache must be an ActivationCache (TransformerLens or patchlab), "
                                 f"got {type(vanilla_cache).__name__}")
    chosen = parse_component(sites)
    n_layers = _cache_layers(vanilla_cache)
    start, stop = _check_window(layers, n_layers)
    spec = None
    if "value" in chosen:
        if not isinstance(vanilla_model, PreTrainedModel):
            raise PatchlabValueError(
                "restoring 'value' needs vanilla_model=pair.vanilla_hf (the vanilla down projection weights)")
        spec = arch_spec(vanilla_model)
        if len(spec.layer_modules(vanilla_model)) != n_layers:
            raise PatchlabValueError(f"vanilla_model has {len(spec.layer_modules(vanilla_model))} layers, "
                                     f"the vanilla cache {n_layers}")
    keys = _PATCHLAB_KEYS if isinstance(vanilla_cache, ActivationCache) else TL_HOOKS
    probe = keys["attn" if "attn" in chosen else "coef"].format(layer=min(start, n_layers - 1))
    mask = _check_positions(positions, _cached(vanilla_cache, probe).shape[1])
    hooks: list[Hook] = []
    for i in range(start, stop):
        if "attn" in chosen:
            hooks.append((TL_HOOKS["attn"].format(layer=i),
                          _overwrite_hook(_cached(vanilla_cache, keys["attn"].format(layer=i)), mask)))
        coef = _cached(vanilla_cache, keys["coef"].format(layer=i)) if "coef" in chosen else None
        stash: dict[str, torch.Tensor] | None = {} if spec is not None else None
        if coef is not None or stash is not None:
            hooks.append((TL_HOOKS["coef"].format(layer=i), _overwrite_hook(coef, mask, stash)))
        if stash is not None:
            hooks.append((TL_HOOKS["value"].format(layer=i), _value_hook(spec, vanilla_model, i, mask, stash)))
    return hooks
