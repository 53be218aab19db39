"""Architecture registry: where the paper's three sites live in each model family.

For every decoder layer ``i`` the paper (Hong et al., section 3) studies

* **coef** - the MLP coefficient scores, i.e. the *input* of the MLP down/out projection,
  shape ``[batch, seq, d_mlp]``;
* **value** - the MLP value vectors, i.e. the down/out projection *weight* (``d_mlp`` columns of
  size ``d_model``);
* **attn** - the attention output, i.e. the *output* of the attention block's output projection,
  shape ``[batch, seq, d_model]``.

An :class:`ArchSpec` names these as module paths relative to the root of a Hugging Face causal LM,
so the rest of patchlab never special-cases a family. Register a new family with
:func:`register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchlab.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (relative to the ``*ForCausalLM`` root).

    Attributes:
        layers: path of the ``ModuleList`` of decoder layers, e.g. ``"model.layers"``.
        attn_out: path of the attention output projection inside a layer, e.g. ``"self_attn.o_proj"``.
        mlp_down: path of the MLP down/out projection inside a layer, e.g. ``"mlp.down_proj"``.
        conv1d: True when ``mlp_down`` is a GPT-2 ``Conv1D`` whose weight is stored ``[d_in, d_out]``
            (transposed with respect to ``nn.Linear``'s ``[d_out, d_in]``).
    """

    layers: str
    attn_out: str
    mlp_down: str
    conv1d: bool = False

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``."""
        return model.get_submodule(self.layers)

    def down_proj(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP down/out projection module of ``layer``."""
        return self.layer_modules(model)[layer].get_submodule(self.mlp_down)

    def value_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Value vectors of ``layer`` as an ``nn.Linear``-style weight ``[d_model, d_mlp]`` (a view)."""
        weight = self.down_proj(model, layer).weight
        return weight.T if self.conv1d else weight


_LLAMA_LIKE = ArchSpec(layers="model.layers", attn_out="self_attn.o_proj", mlp_down="mlp.down_proj")

_REGISTRY: dict[str, ArchSpec] = {
    **{name: _LLAMA_LIKE for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "olmo3", "phi3", "granite", "cohere")},
    "gpt2": ArchSpec(layers="transformer.h", attn_out="attn.c_proj", mlp_down="mlp.c_proj", conv1d=True),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", attn_out="attention.dense", mlp_down="mlp.dense_4h_to_h"),
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
        layers[0].get_submodule(spec.attn_out)
        layers[0].get_submodule(spec.mlp_down)
    except (AttributeError, IndexError, TypeError) as err:
        raise UnsupportedArchitectureError(
            f"model of type {model_type!r} does not have the registered modules {spec}: {err}") from err
    return spec
