"""A vanilla / unlearned pair that never holds both models in memory at once.

``load_pair(vanilla, unlearned, sequential=True)`` checks the two checkpoints from their configs and file headers
(no weights loaded), then a sweep uses one model at a time (:meth:`SequentialPair.using`): the vanilla model runs
first (reference answers, its activations at the restored sites, its logits), is released, and the unlearned model
runs the patched forward passes. Restorations that recompute with the vanilla weights (``value``, ``heads``) read
them layer by layer from the vanilla checkpoint's safetensors files (:class:`~patchlab.pair.weights.CheckpointWeights`).
The numbers equal those of a pair held in memory; the peak memory is about one model plus the cached activations.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PairMismatchError, PatchlabValueError
from patchlab.pair.adapters import AdapterBaseWarning
from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.pair.weights import CheckpointTensors, CheckpointWeights, check_safetensors


def meta_skeleton(config: PretrainedConfig, **from_config: Any) -> PreTrainedModel:
    """The model of ``config`` with its parameters on the meta device (no memory): module names and shapes only.
    ``from_config``: keyword arguments of ``AutoModelForCausalLM.from_config`` (e.g. ``dtype``)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, **from_config)


@dataclass
class SequentialPair:
    """A pair whose models are loaded one at a time (see the module docstring); the sweeps accept it wherever they
    accept a :class:`~patchlab.pair.loading.ModelPair`, except the nnsight loop engine and
    :func:`patchlab.run_with_cache`, which need both models in memory.

    Attributes:
        specs: ``{"vanilla": checkpoint directory, "unlearned": checkpoint or adapter directory}``.
        load: the keyword arguments each model is loaded with (:func:`~patchlab.pair.loading.load_model`).
        tokenizer: the shared tokenizer. arch: the family's spec. sources: how the checkpoints were given.
        skeleton: the vanilla model on the meta device (names and shapes).
        dtype: the dtype both models are loaded in (``None``: as stored).
        adapter: for an unlearned PEFT adapter, the adapter, its base and their joint weights digest
            (:func:`~patchlab.pair.loading.adapter_record`); ``None`` otherwise.
    """

    specs: dict[str, Any]
    load: dict[str, dict[str, Any]]
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    sources: tuple[str, str]
    skeleton: PreTrainedModel
    dtype: torch.dtype | None = None
    adapter: dict[str, str] | None = None
    _resident: dict[str, PreTrainedModel] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L."""
        return len(self.arch.layer_modules(self.skeleton))

    @contextlib.contextmanager
    def using(self, which: str) -> Iterator[PreTrainedModel]:
        """Load the model ``which`` (``"vanilla"`` / ``"unlearned"``), yield it, and release it on exit (the other
        one is never loaded meanwhile). Its memory is freed once nothing else refers to it: ``del`` the name a
        ``with ... as model`` bound before using the other one."""
        from patchlab.pair.loading import load_model

        if which not in self.specs:
            raise PatchlabValueError(f"which must be 'vanilla' or 'unlearned', got {which!r}")
        if self._resident:
            raise PatchlabValueError(f"a sequential pair holds one model at a time: {next(iter(self._resident))!r} "
                                     f"is in use, {which!r} cannot be loaded beside it")
        with warnings.catch_warnings():  # load_pair announced a foreign adapter base once
            warnings.simplefilter("ignore", AdapterBaseWarning)
            self._resident[which] = load_model(self.specs[which], **self.load[which])
        try:
            yield self._resident[which]
        finally:
            self._resident.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def source_weights(self) -> CheckpointWeights:
        """The vanilla weights of the recomputed sites, read from the vanilla checkpoint's files layer by layer."""
        return CheckpointWeights(self.specs["vanilla"], self.arch, self.skeleton, dtype=self.dtype)


def _checkpoint_dir(spec: Any, what: str) -> Path:
    """A local checkpoint directory for ``spec``: the directory itself, or a hub id's local snapshot."""
    if isinstance(spec, PreTrainedModel):
        raise PatchlabValueError(f"sequential=True reads the {what} checkpoint from its files: pass a directory or "
                                 "a hub id, not an in-memory model")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from patchlab.pair.loading import _source

    _source(spec, what)  # a missing local path fails here with a clear error
    return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


#: safetensors dtype names of floating-point tensors -> torch dtype names.
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2"}


def stored_dtypes(tensors: CheckpointTensors) -> list[str]:
    """The dtypes of a checkpoint's floating-point tensors as stored (``["bfloat16"]``, sorted torch names)."""
    return sorted({_FLOAT_DTYPES[d] for d in tensors.dtypes.values() if d in _FLOAT_DTYPES})


def sequential_pair(vanilla: Any, unlearned: Any, *, tokenizer: PreTrainedTokenizerBase,
                    load: Sequence[Mapping[str, Any]], adapter_base: Any = None,
                    adapter: dict[str, str] | None = None) -> SequentialPair:
    """Check a pair from its configs and file headers and return it unloaded (:class:`SequentialPair`); ``load``
    holds the vanilla and the unlearned model's :func:`~patchlab.pair.loading.load_model` keyword arguments.
    ``unlearned`` may be a local PEFT adapter directory, merged onto ``adapter_base`` (default the vanilla
    checkpoint) when loaded; ``adapter``: its record for provenance.

    Raises:
        PatchlabValueError: an in-memory model (it is in memory already: use ``sequential=False``).
        PairMismatchError: different architectures, sizes, tensor shapes, or stored weight dtypes when the pair is
            loaded as stored (no ``dtype``).
        PatchlabFileError: a directory that does not exist, holds no safetensors checkpoint or a truncated / corrupt
            one (named), or a config transformers cannot read (an unknown ``model_type``).
    """
    from patchlab.pair.adapters import is_adapter
    from patchlab.pair.loading import _from_pretrained, check_configs, check_dtypes, check_vocab_size
    from patchlab.provenance import describe_source

    v_dir = _checkpoint_dir(vanilla, "vanilla")
    u_dir = Path(unlearned) if is_adapter(unlearned) else _checkpoint_dir(unlearned, "unlearned")
    config = _from_pretrained(AutoConfig, v_dir, "vanilla model config")
    skeleton = meta_skeleton(config)
    spec = arch_spec(skeleton)
    tensors_v = CheckpointTensors(v_dir, "vanilla")
    if not is_adapter(unlearned):
        check_configs(config, _from_pretrained(AutoConfig, u_dir, "unlearned model config"))
        tensors_u = CheckpointTensors(u_dir, "unlearned")
        for name, shape in tensors_v.shapes.items():
            if name in tensors_u.shapes and tensors_u.shapes[name] != shape:
                raise PairMismatchError(f"tensor {name} has shape {shape} in vanilla but {tensors_u.shapes[name]} in "
                                        "unlearned")
        if load[0].get("dtype") is None:
            check_dtypes(stored_dtypes(tensors_v), stored_dtypes(tensors_u))
    else:
        check_safetensors(u_dir, f"the adapter {str(u_dir)!r}")  # now, not when a sweep first loads it
    check_vocab_size(tokenizer, config)
    load_u = {**load[1], **({"adapter_base": adapter_base or v_dir} if is_adapter(unlearned) else {})}
    return SequentialPair(specs={"vanilla": v_dir, "unlearned": u_dir}, load={"vanilla": dict(load[0]),
                                                                             "unlearned": load_u},
                          tokenizer=tokenizer, arch=spec, sources=(describe_source(v_dir), describe_source(unlearned)),
                          skeleton=skeleton, dtype=load[0].get("dtype"), adapter=adapter)


__all__ = ["SequentialPair", "sequential_pair"]

