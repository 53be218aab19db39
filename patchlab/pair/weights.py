"""Where restorations read the source model's weights, and tensors of a checkpoint directory read one at a time.

* :class:`ModelWeights`: a site module's parameters from an in-memory model (also when a device map offloads them);
* :class:`CheckpointWeights`: the same read from the checkpoint's safetensors files, for a one-model-at-a-time pair
  whose vanilla model is never in memory during the patched passes;
* :class:`CheckpointTensors`: named tensors of a safetensors checkpoint directory (sharded too), read one at a time
  without loading the model; the parameter diffs stream two checkpoints through it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

import torch
from safetensors import SafetensorError, safe_open

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.pair.arch import ArchSpec
from patchlab.pair.placement import parameter_value
from patchlab.pair.sites import Site


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)`` (PyTorch tensors), with a :class:`PatchlabFileError` naming ``path`` when the file is
    missing, truncated or otherwise not a valid safetensors file."""
    try:
        with safe_open(path, "pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise PatchlabFileError(f"{path} is truncated or corrupt ({err}); re-save or re-download the checkpoint"
                                ) from err


def check_safetensors(root: Path, what: str) -> None:
    """Raise :class:`PatchlabFileError` ``could not load {what}: {file} is truncated or corrupt`` for the first
    ``*.safetensors`` file of ``root`` (sorted by name) whose header cannot be read or does not cover the file; only
    the headers are read."""
    for path in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise PatchlabFileError(f"could not load {what}: {path} is truncated or corrupt ({err}); re-save or "
                                    "re-download it") from err


class CheckpointTensors:
    """The named tensors of a checkpoint directory (``model.safetensors`` or a sharded index), by parameter name.

    Attributes:
        root: the directory. shapes: ``{name: shape}`` of every tensor (read from the file headers only).
        dtypes: ``{name: stored dtype}`` of every tensor (safetensors names: ``"F32"``, ``"BF16"``...).
        model_type: ``config.json``'s ``model_type`` (``None`` without a config).

    Raises:
        PatchlabFileError: the directory does not exist or holds no safetensors checkpoint.
    """

    def __init__(self, root: str | os.PathLike, what: str = "checkpoint"):
        self.root, self.what = Path(root), what
        if not self.root.is_dir():
            raise PatchlabFileError(f"{what} checkpoint directory {str(root)!r} does not exist")
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.root / "model.safetensors").exists():
            with open_safetensors(self.root / "model.safetensors") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise PatchlabFileError(f"{self.root} holds no safetensors checkpoint (model.safetensors or its index); "
                                    "re-save it with save_pretrained(..., safe_serialization=True)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in sorted(set(self.weight_map.values())):
            with open_safetensors(self.root / file) as f:
                for name in f.keys():
                    if self.weight_map.get(name) == file:
                        tensor = f.get_slice(name)
                        self.shapes[name], self.dtypes[name] = tuple(tensor.get_shape()), tensor.get_dtype()
        config = self.root / "config.json"
        self.model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its file (CPU, stored dtype).

        Raises:
            PatchlabValueError: no such tensor in the checkpoint.
        """
        if name not in self.weight_map:
            raise PatchlabValueError(f"{self.root} holds no tensor {name!r}")
        with open_safetensors(self.root / self.weight_map[name]) as f:
            return f.get_tensor(name)


class CheckpointWeights:
    """A site module's parameters read from a checkpoint directory instead of an in-memory model, for restorations
    that recompute with the vanilla weights (``value``, ``heads``) in a one-model-at-a-time pair.

    The last ``keep`` modules read stay in memory (a sweep visits the layers window by window, so each is read about
    once), cast to ``dtype`` (the dtype the loaded models compute in), on the device they were requested on (keyed
    by it: a module asked for on another device is read again), so repeated requests copy nothing.
    """

    def __init__(self, root: str | os.PathLike, spec: ArchSpec, skeleton: torch.nn.Module, *,
                 dtype: torch.dtype | None = None, keep: int = 8):
        self.tensors, self.spec, self.skeleton, self.dtype = CheckpointTensors(root, "vanilla"), spec, skeleton, dtype
        self.keep, self._cache = keep, OrderedDict()

    def _name(self, name: str) -> str:
        """The checkpoint's key of parameter ``name``: as named, or without the model's base prefix (old GPT-2
        checkpoints store ``h.0...`` for ``transformer.h.0...``)."""
        if name in self.tensors.weight_map:
            return name
        prefix = getattr(self.skeleton, "base_model_prefix", "")
        short = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name
        if short in self.tensors.weight_map:
            return short
        raise PatchlabValueError(f"the vanilla checkpoint {self.tensors.root} holds no {name!r}")

    def params(self, site: Site, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``{"weight": ..., "bias": ...}`` of ``site``'s module in ``layer``, on ``device``."""
        key = (site.name, layer, torch.device(device))
        if key not in self._cache:
            self._cache[key] = self._read(site, layer, key[2])
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return dict(self._cache[key])

    def _read(self, site: Site, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``site``'s module parameters in ``layer`` read from the checkpoint, cast to ``dtype``, on ``device``."""
        prefix = ".".join(p for p in (self.spec.layers, str(layer), site.module) if p)
        module = self.spec.site_module(self.skeleton, site, layer)
        stored = {n: self.tensors.get(self._name(f"{prefix}.{n}")) for n, _ in module.named_parameters(recurse=False)}
        return {n: (v.to(self.dtype) if self.dtype is not None else v).to(device) for n, v in stored.items()}


def site_params(model: PreTrainedModel, spec: ArchSpec, site: Site, layer: int) -> dict[str, torch.Tensor]:
    """The parameters of ``site``'s module in ``layer`` by local name (``weight``, ``bias``), with real values on
    the module's execution device, also when a device map offloads them (:func:`patchlab.pair.placement.parameter_value`)."""
    prefix = ".".join(p for p in (spec.layers, str(layer), site.module) if p)
    module = spec.site_module(model, site, layer)
    return {name: parameter_value(model, f"{prefix}.{name}") for name, _ in module.named_parameters(recurse=False)}


class ModelWeights:
    """A site module's parameters read from an in-memory (possibly dispatched) source model."""

    def __init__(self, model: PreTrainedModel, spec: ArchSpec):
        self.model, self.spec = model, spec

    def params(self, site: Site, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``{"weight": ..., "bias": ...}`` of ``site``'s module in ``layer``, on ``device``."""
        return {k: v.to(device) for k, v in site_params(self.model, self.spec, site, layer).items()}
