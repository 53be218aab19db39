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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.adapters import AdapterBaseWarning
from patchlab.pair.arch import ArchSpec
from patchlab.pair.weights import CheckpointWeights


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
        load: the keyword arguments each model is loaded with (by ``loader``).
        loader: the function loading one model from its spec and keyword arguments
            (:func:`~patchlab.pair.loading.load_model`).
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
    loader: Callable[..., PreTrainedModel]
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
        if which not in self.specs:
            raise PatchlabValueError(f"which must be 'vanilla' or 'unlearned', got {which!r}")
        if self._resident:
            raise PatchlabValueError(f"a sequential pair holds one model at a time: {next(iter(self._resident))!r} "
                                     f"is in use, {which!r} cannot be loaded beside it")
        with warnings.catch_warnings():  # load_pair announced a foreign adapter base once
            warnings.simplefilter("ignore", AdapterBaseWarning)
            self._resident[which] = self.loader(self.specs[which], **self.load[which])
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


__all__ = ["SequentialPair", "meta_skeleton"]
