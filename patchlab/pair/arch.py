"""Architecture registry: where each site lives in each model family, as data.

An :class:`ArchSpec` names module paths relative to the root of a Hugging Face causal LM (the decoder layers,
the final norm) and holds the family's table of :class:`~patchlab.pair.sites.Site` s, each a module path
*inside a decoder layer*. The built-in table (:func:`~patchlab.pair.sites.default_sites`) has the paper's three
sites (Hong et al., section 3):

* **coef** - the MLP coefficient scores, i.e. the *input* of the MLP down/out projection, ``[batch, seq, d_mlp]``;
* **value** - the MLP value vectors, i.e. the down/out projection *weight* (``d_mlp`` columns of size ``d_model``);
* **attn** - the attention output, i.e. the *output* of the attention output projection, ``[batch, seq, d_model]``;

and ``heads`` (per-head attention), ``mlp_out`` (the MLP block's output) and ``resid`` (the decoder layer's
output). Nothing else in patchlab special-cases a family: register a new family with
:func:`register_architecture`, a new site with :func:`register_site`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from patchlab.errors import PatchlabValueError, UnsupportedArchitectureError
from patchlab.pair.sites import Site, default_sites, submodule


#: Module types of parameters (densities, parameter diffs), in display order; ``other`` is anything a family's
#: :attr:`ArchSpec.module_types` does not name.
MODULE_ORDER = ["embedding", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate", "mlp_up", "mlp_gate_up",
                "mlp_down", "norm", "lm_head", "other"]


def module_order(present: Sequence[str]) -> list[str]:
    """The module types of ``present`` (repeats allowed) in :data:`patchlab.pair.arch.MODULE_ORDER`; types outside
    that order are left out."""
    present = set(present)
    return [m for m in MODULE_ORDER if m in present]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths and the site table of one model family.

    Attributes:
        layers: path of the ``ModuleList`` of decoder layers, e.g. ``"model.layers"``.
        attn_out: path of the attention output projection inside a layer, e.g. ``"self_attn.o_proj"``.
        mlp_down: path of the MLP down/out projection inside a layer, e.g. ``"mlp.down_proj"``.
        mlp: path of the MLP block inside a layer (default ``"mlp"``).
        final_norm: path of the norm applied before the unembedding, from the root (e.g. ``"model.norm"``);
            ``None`` for families without one.
        conv1d: True when ``mlp_down`` is a GPT-2 ``Conv1D`` whose weight is stored ``[d_in, d_out]``
            (transposed with respect to ``nn.Linear``'s ``[d_out, d_in]``).
        sites: the site table; default :func:`~patchlab.pair.sites.default_sites` of the paths above.
        module_types: module path -> module type (one of :data:`MODULE_ORDER`) for the modules that own
            parameters: paths inside a decoder layer (``"self_attn.q_proj"``) for layer modules, from the root
            (``"model.embed_tokens"``) for the others. ``attn_out``, ``mlp_down`` and ``final_norm`` are added
            as ``attn_o``, ``mlp_down`` and ``norm``; an unnamed module is ``other``.
    """

    layers: str
    attn_out: str
    mlp_down: str
    mlp: str = "mlp"
    final_norm: str | None = "model.norm"
    conv1d: bool = False
    sites: tuple[Site, ...] = field(default=())
    module_types: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.sites:
            object.__setattr__(self, "sites", default_sites(self.attn_out, self.mlp_down, self.mlp))
        known = {self.attn_out: "attn_o", self.mlp_down: "mlp_down", **({self.final_norm: "norm"} if self.final_norm
                                                                          else {}), **self.module_types}
        unknown = sorted(set(known.values()) - set(MODULE_ORDER))
        if unknown:
            raise PatchlabValueError(f"unknown module types {unknown}; choose from {', '.join(MODULE_ORDER)}")
        object.__setattr__(self, "module_types", known)
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise PatchlabValueError(f"site names must be unique, got {names}")

    def site(self, name: str) -> Site:
        """The site called ``name``; raises PatchlabValueError listing the known ones."""
        for s in self.sites:
            if s.name == name:
                return s
        raise PatchlabValueError(f"unknown site {name!r}; this family has {', '.join(self.site_names)}")

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def with_site(self, site: Site, *, overwrite: bool = False) -> ArchSpec:
        """This spec with ``site`` added to its table (replacing a site of the same name if ``overwrite``)."""
        if site.name in self.site_names and not overwrite:
            raise PatchlabValueError(f"site {site.name!r} already exists; pass overwrite=True to replace it")
        kept = tuple(s for s in self.sites if s.name != site.name)
        return dataclasses.replace(self, sites=kept + (site,))

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``."""
        return model.get_submodule(self.layers)

    def site_module(self, model: nn.Module, site: str | Site, layer: int) -> nn.Module:
        """The module of ``site`` in decoder layer ``layer`` of ``model``."""
        site = self.site(site) if isinstance(site, str) else site
        return submodule(self.layer_modules(model)[layer], site.module)

    def down_proj(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP down/out projection module of ``layer``."""
        return self.layer_modules(model)[layer].get_submodule(self.mlp_down)

    def value_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Value vectors of ``layer`` as an ``nn.Linear``-style weight ``[d_model, d_mlp]`` (a view)."""
        weight = self.down_proj(model, layer).weight
        return weight.T if self.conv1d else weight

    def split_name(self, name: str) -> tuple[int | None, str]:
        """``(layer, module path inside the layer)`` of a parameter name in a decoder layer, else ``(None, module
        path from the root)``. Leading path components may be missing or extra, as in GPT-2's original files
        (``h.0.attn.c_attn.weight``, ``wte.weight``) or a PEFT wrapper (``base_model.model.model.layers...``)."""
        module = name.rsplit(".", 1)[0]
        match = re.search(rf"(?:^|\.){re.escape(self.layers.rsplit('.', 1)[-1])}\.(\d+)\.(.+)$", module)
        return (int(match[1]), match[2]) if match else (None, module)

    def module_type(self, name: str) -> str:
        """The module type (:data:`MODULE_ORDER`) of parameter ``name``, a ``named_parameters()`` or state-dict
        key: its module path (:meth:`split_name`) looked up in :attr:`module_types`, ``other`` when absent."""
        layer, module = self.split_name(name)
        if module in self.module_types:
            return self.module_types[module]
        if layer is None:  # root paths written with fewer or more leading components
            for path, kind in self.module_types.items():
                if ("." + path).endswith("." + module) or ("." + module).endswith("." + path):
                    return kind
        return "other"

    def norm(self, model: nn.Module) -> nn.Module | None:
        """The final norm module (``None`` when the family has none)."""
        return model.get_submodule(self.final_norm) if self.final_norm else None


#: Module types of the LLaMA-like families: the union of their norms (OLMo-2's and Gemma-2's post-norms,
#: Qwen-3's and Gemma-3's q/k norms); a family simply lacks the modules it does not have.
_LLAMA_MODULES = {
    "model.embed_tokens": "embedding", "lm_head": "lm_head",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up",
    **dict.fromkeys(("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"), "norm"),
}
_LLAMA_LIKE = ArchSpec(layers="model.layers", attn_out="self_attn.o_proj", mlp_down="mlp.down_proj",
                       module_types=_LLAMA_MODULES)

_REGISTRY: dict[str, ArchSpec] = {
    **{name: _LLAMA_LIKE for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "olmo3", "granite", "cohere")},
    "phi3": dataclasses.replace(_LLAMA_LIKE, module_types={**_LLAMA_MODULES, "self_attn.qkv_proj": "attn_qkv",
                                                           "mlp.gate_up_proj": "mlp_gate_up"}),
    "gpt2": ArchSpec(layers="transformer.h", attn_out="attn.c_proj", mlp_down="mlp.c_proj", final_norm="transformer.ln_f",
                     conv1d=True, module_types={
                         "transformer.wte": "embedding", "transformer.wpe": "embedding", "lm_head": "lm_head",
                         "attn.c_attn": "attn_qkv", "mlp.c_fc": "mlp_up", "ln_1": "norm", "ln_2": "norm"}),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", attn_out="attention.dense", mlp_down="mlp.dense_4h_to_h",
                         final_norm="gpt_neox.final_layer_norm", module_types={
                             "gpt_neox.embed_in": "embedding", "lm_head": "lm_head", "embed_out": "lm_head",
                             "attention.query_key_value": "attn_qkv", "mlp.dense_h_to_4h": "mlp_up",
                             "input_layernorm": "norm", "post_attention_layernorm": "norm"}),
}


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Teach patchlab a new family, keyed by ``config.model_type``.

    Example::

        patchlab.register_architecture(
            "my_lm", patchlab.ArchSpec(layers="model.blocks", attn_out="attn.out", mlp_down="ffn.w2"))
    """
    if model_type in _REGISTRY and not overwrite:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[model_type] = spec


def register_site(site: Site, model_types: str | Iterable[str] | None = None, *, overwrite: bool = False) -> None:
    """Add ``site`` to the site table of ``model_types`` (default: every registered family).

    The new site then works in caches, both engines, sweeps and the TransformerLens adapter, e.g. the input of
    the attention output projection (the concatenated head outputs)::

        patchlab.register_site(patchlab.Site("z", "self_attn.o_proj", "input", "overwrite"), "llama")

    Raises:
        PatchlabValueError: the site name exists (without ``overwrite``), or a model type is not registered.
    """
    types = list(_REGISTRY) if model_types is None else [model_types] if isinstance(model_types, str) \
        else list(model_types)
    unknown = [t for t in types if t not in _REGISTRY]
    if unknown:
        raise PatchlabValueError(f"unknown model types {unknown}; registered: {', '.join(supported_architectures())}")
    updated = {t: _REGISTRY[t].with_site(site, overwrite=overwrite) for t in types}
    _REGISTRY.update(updated)


def unregister_site(name: str, model_types: str | Iterable[str] | None = None) -> None:
    """Remove the site ``name`` from the tables of ``model_types`` (default: every family that has it)."""
    types = list(_REGISTRY) if model_types is None else [model_types] if isinstance(model_types, str) \
        else list(model_types)
    for t in types:
        spec = _REGISTRY[t]
        if name in spec.site_names:
            _REGISTRY[t] = dataclasses.replace(spec, sites=tuple(s for s in spec.sites if s.name != name))


def supported_architectures() -> tuple[str, ...]:
    """The ``config.model_type`` values patchlab knows, sorted."""
    return tuple(sorted(_REGISTRY))


def spec_for_type(model_type: str | None) -> ArchSpec | None:
    """The registered :class:`ArchSpec` of a ``config.model_type``, or ``None``."""
    return _REGISTRY.get(model_type) if model_type else None


def arch_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a Hugging Face model, checked against the model's actual modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}. "
            "Register a new family with patchlab.register_architecture(model_type, "
            "patchlab.ArchSpec(layers=..., attn_out=..., mlp_down=...)).")
    spec = _REGISTRY[model_type]
    try:
        layers = spec.layer_modules(model)
        for site in spec.sites:
            submodule(layers[0], site.module)
    except (AttributeError, IndexError, TypeError, PatchlabValueError) as err:
        raise UnsupportedArchitectureError(
            f"model of type {model_type!r} does not have the registered modules {spec}: {err}") from err
    return spec


def n_heads(model: nn.Module) -> int:
    """The number of attention heads per layer (``config.num_attention_heads`` or ``n_head``)."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not isinstance(count, int) or count < 1:
        raise UnsupportedArchitectureError(f"cannot read the head count of {type(model).__name__} from its config")
    return count


def layer_index(name: str, spec: ArchSpec | None = None) -> int | None:
    """The decoder layer of parameter ``name`` (``None`` for embeddings, final norm, head): by ``spec``'s layer
    path (:meth:`ArchSpec.split_name`), or without a spec the first ``.<int>.`` component of the name."""
    if spec is not None:
        return spec.split_name(name)[0]
    match = re.search(r"\.(\d+)\.", name)
    return int(match[1]) if match else None
