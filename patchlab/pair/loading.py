"""Loading a vanilla checkpoint and its unlearned copy as one traced, validated pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from nnsight import TransformersModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.provenance import describe_source
from patchlab.errors import PairMismatchError, PatchlabFileError, PatchlabValueError

ModelSpec = Union[str, os.PathLike, PreTrainedModel]
TokenizerSpec = Union[str, os.PathLike, PreTrainedTokenizerBase, None]


def _looks_like_path(spec: str | os.PathLike) -> bool:
    """True unless ``spec`` has the form of a hub id (``name`` or ``org/name``)."""
    text = str(spec)
    return not isinstance(spec, str) or text.startswith((".", "/", "~")) or text.count("/") > 1


def _from_pretrained(loader: Any, spec: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec)`` with a patchlab error for a missing directory or unreachable hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PatchlabFileError(f"{what} path {str(spec)!r} is a file; expected a Hugging Face checkpoint directory")
        spec = str(path)
    elif _looks_like_path(spec):
        raise PatchlabFileError(f"{what} directory {str(spec)!r} does not exist")
    try:
        return loader.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as err:
        raise PatchlabFileError(
            f"could not load {what} from {str(spec)!r} (a local checkpoint directory, or a hub id when online): {err}"
        ) from err


def load_model(spec: ModelSpec, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
               ) -> PreTrainedModel:
    """A Hugging Face causal LM in eval mode, from a local directory, a hub id, or an in-memory model.

    An in-memory model is returned as is, converted in place when ``dtype``/``device`` are given.

    Raises:
        PatchlabFileError: the directory does not exist or holds no loadable checkpoint, or the hub id
            cannot be reached.
        PatchlabValueError: ``spec`` is of another type.
    """
    if isinstance(spec, PreTrainedModel):
        model = spec
    elif isinstance(spec, (str, os.PathLike)):
        model = _from_pretrained(AutoModelForCausalLM, spec, "model", **({"dtype": dtype} if dtype else {}))
    else:
        raise PatchlabValueError(f"a model must be a path, a hub id or a PreTrainedModel, got {type(spec).__name__}")
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def load_tokenizer(spec: TokenizerSpec | ModelSpec) -> PreTrainedTokenizerBase:
    """A tokenizer from a path or hub id (returned as is when already a tokenizer)."""
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if isinstance(spec, PreTrainedModel):
        raise PatchlabValueError("an in-memory model carries no tokenizer: pass tokenizer=... explicitly")
    if not isinstance(spec, (str, os.PathLike)):
        raise PatchlabValueError(f"a tokenizer must be a path, a hub id or a tokenizer, got {type(spec).__name__}")
    return _from_pretrained(AutoTokenizer, spec, "tokenizer")


def _config_signature(model: PreTrainedModel) -> dict[str, Any]:
    cfg = model.config
    return {
        "architecture": cfg.model_type,
        "layer count": cfg.num_hidden_layers,
        "hidden size": cfg.hidden_size,
        "intermediate size": getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None),
        "vocab size": cfg.vocab_size,
    }


def check_compatible(vanilla: PreTrainedModel, unlearned: PreTrainedModel) -> None:
    """Raise :class:`PairMismatchError` unless both models share architecture, sizes and parameter shapes."""
    sig_v, sig_u = _config_signature(vanilla), _config_signature(unlearned)
    for key in sig_v:
        if sig_v[key] != sig_u[key]:
            raise PairMismatchError(f"vanilla and unlearned models differ in {key}: {sig_v[key]!r} vs {sig_u[key]!r}")
    shapes_v = {n: tuple(p.shape) for n, p in vanilla.named_parameters()}
    shapes_u = {n: tuple(p.shape) for n, p in unlearned.named_parameters()}
    if shapes_v.keys() != shapes_u.keys():
        diff = sorted(shapes_v.keys() ^ shapes_u.keys())[:5]
        raise PairMismatchError(f"vanilla and unlearned models have different parameters, e.g. {diff}")
    for name, shape in shapes_v.items():
        if shapes_u[name] != shape:
            raise PairMismatchError(f"parameter {name} has shape {shape} in vanilla but {shapes_u[name]} in unlearned")
    dev_v, dev_u = next(vanilla.parameters()).device, next(unlearned.parameters()).device
    if dev_v != dev_u:
        raise PairMismatchError(f"vanilla is on {dev_v} but unlearned on {dev_u}; pass device=... to load_pair")


def check_tokenizers(tok_v: PreTrainedTokenizerBase, tok_u: PreTrainedTokenizerBase) -> None:
    """Raise :class:`PairMismatchError` unless both tokenizers map every token to the same id."""
    if tok_v.get_vocab() != tok_u.get_vocab():
        raise PairMismatchError("the vanilla and unlearned checkpoints ship different tokenizers (vocabularies differ)")


@dataclass(frozen=True)
class ModelPair:
    """A vanilla model and its unlearned copy, traced with nnsight and sharing one tokenizer.

    Attributes:
        vanilla: nnsight model wrapping ``vanilla_hf`` (``pair.vanilla.model.layers[3].mlp.down_proj.input``...).
        unlearned: nnsight model wrapping ``unlearned_hf``.
        vanilla_hf: the underlying Hugging Face model (eval mode).
        unlearned_hf: the underlying Hugging Face model (eval mode).
        tokenizer: the shared tokenizer.
        arch: module paths and the site table of this family.
        sources: how the two checkpoints were given (a resolved path, a hub id, or ``"in-memory ..."``), for
            provenance (:func:`patchlab.provenance.pair_provenance`).
    """

    vanilla: TransformersModel
    unlearned: TransformersModel
    vanilla_hf: PreTrainedModel
    unlearned_hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    sources: tuple[str, str] = ("", "")

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L."""
        return len(self.arch.layer_modules(self.vanilla_hf))

    @property
    def device(self) -> torch.device:
        return next(self.vanilla_hf.parameters()).device


def trace_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> TransformersModel:
    """Wrap a Hugging Face causal LM for nnsight tracing, with the tokenizer given explicitly."""
    return TransformersModel(model, task="text-generation", tokenizer=tokenizer)


def load_pair(vanilla: ModelSpec, unlearned: ModelSpec, *, tokenizer: TokenizerSpec = None,
              dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> ModelPair:
    """Load and validate a vanilla / unlearned pair.

    Args:
        vanilla: local checkpoint directory, hub id, or in-memory ``PreTrainedModel``.
        unlearned: same, for the unlearned copy.
        tokenizer: shared tokenizer (object, directory or hub id). Defaults to the vanilla checkpoint's; when
            both checkpoints ship a tokenizer they must agree.
        dtype: load/cast both models to this dtype (e.g. ``torch.bfloat16``); default: as stored.
        device: move both models there (e.g. ``"cuda"``).

    Raises:
        PatchlabFileError: a path does not exist / holds no checkpoint.
        PairMismatchError: different architecture, layer count, hidden/intermediate/vocab size, parameter
            shapes, device or tokenizer.
        UnsupportedArchitectureError: the family is not in the registry (see ``register_architecture``).
    """
    model_v = load_model(vanilla, dtype=dtype, device=device)
    model_u = load_model(unlearned, dtype=dtype, device=device)
    if model_v is model_u:
        raise PairMismatchError("vanilla and unlearned are the same model object; pass two distinct models")
    check_compatible(model_v, model_u)
    spec = arch_spec(model_v)
    if tokenizer is None:
        tok = load_tokenizer(vanilla)
        if isinstance(unlearned, (str, os.PathLike)) and (Path(unlearned) / "tokenizer_config.json").exists():
            check_tokenizers(tok, load_tokenizer(unlearned))
    else:
        tok = load_tokenizer(tokenizer)
    if len(tok) > model_v.config.vocab_size:
        raise PairMismatchError(
            f"tokenizer has {len(tok)} tokens but the models' vocabulary has {model_v.config.vocab_size} rows")
    return ModelPair(vanilla=trace_model(model_v, tok), unlearned=trace_model(model_u, tok),
                     vanilla_hf=model_v, unlearned_hf=model_u, tokenizer=tok, arch=spec,
                     sources=(describe_source(vanilla), describe_source(unlearned)))
