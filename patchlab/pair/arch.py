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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from patchlab.errors import PatchlabValueError, UnsupportedArchitectureError
from patchlab.pair.sites import Site, default_sites, submodule


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
    """

    layers: str
    attn_out: str
    mlp_down: str
    mlp: str = "mlp"
    final_norm: str | None = "model.norm"
    conv1d: bool = False
    sites: tuple[Site, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.sites:
            object.__setattr__(self, "sites", default_sites(self.attn_out, self.mlp_down, self.mlp))
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

    def norm(self, model: nn.Module) -> nn.Module | None:
        """The final norm module (``None`` when the family has none)."""
        return model.get_submodule(self.final_norm) if self.final_norm else None


_LLAMA_LIKE = ArchSpec(layers="model.layers", attn_out="self_attn.o_proj", mlp_down="mlp.down_proj")

_REGISTRY: dict[str, ArchSpec] = {
    **{name: _LLAMA_LIKE for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "olmo3", "phi3", "granite", "cohere")},
    "gpt2": ArchSpec(layers="transformer.h", attn_out="attn.c_proj", mlp_down="mlp.c_proj", final_norm="transformer.ln_f",
                     conv1d=True),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", attn_out="attention.dense", mlp_down="mlp.dense_4h_to_h",
                         final_norm="gpt_neox.final_layer_norm"),
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
