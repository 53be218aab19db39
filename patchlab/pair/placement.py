"""Where a model's modules run and where their weights live, under Accelerate's big-model dispatch.

A model loaded with a device map (``load_pair(..., device_map="auto")``) has an Accelerate ``AlignDevicesHook`` on
the modules the map names: the hook moves inputs to the module's *execution device* before each forward pass and,
for modules offloaded to the CPU or disk, loads their weights from the hook's ``weights_map`` for the duration of
the call (the parameters themselves sit on the ``meta`` device). The functions here read that placement, so code
that works on a dispatched model (caching activations, restoring weights) can put each tensor where the module that
uses it runs:

* :func:`execution_device` - the device a module computes on;
* :func:`input_device` - the device of the input embedding, where token ids go;
* :func:`parameter_value` - a parameter's real values, also when offloaded, on its execution device;
* :func:`resolve_device_map` / :func:`dispatch` - the device map of a model or pair, and placing an in-memory model.

An undispatched model is the special case of one device: every function also works on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from patchlab.errors import PatchlabValueError

#: A device map: ``"auto"`` or ``{module name: device}`` (a GPU index, ``"cpu"``, ``"disk"``, ``"cuda:1"``...).
DeviceMap = Union[str, Mapping[str, Union[int, str, torch.device]]]

#: Storage locations of a device map that keep the weights off any accelerator (loaded at each forward pass).
OFFLOAD_LOCATIONS = ("cpu", "disk")


def check_device(device: str | int | torch.device) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a GPU index, a ``torch.device``) as a
    ``torch.device``, checked against this machine before any model moves there: a CUDA device needs a CUDA build
    of torch with a GPU at that index, ``"mps"`` / ``"xpu"`` need that backend.

    Raises:
        PatchlabValueError: ``device`` names no device type torch knows, or one this machine does not have (the
            message says what it has).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise PatchlabValueError(f"unknown device {device!r}: expected e.g. cpu, cuda, cuda:0 or mps") from err
    kind = parsed.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PatchlabValueError(f"device {device!r}: CUDA is not available (this torch "
                                     f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); "
                                     "use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise PatchlabValueError(f"device {device!r}: this machine has {count} CUDA device"
                                     f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise PatchlabValueError(f"device {device!r}: the MPS backend (Apple GPUs) is not available here; use cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise PatchlabValueError(f"device {device!r}: no Intel XPU is available here; use cpu")
    return parsed


def _hooks(module: nn.Module) -> list[Any]:
    """The Accelerate hooks attached to ``module`` (a ``SequentialHook`` unpacked), possibly none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    """``model.get_submodule(name)`` and its ancestors up to ``model``, innermost first."""
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1)]


def _module_name(model: nn.Module, module: str | nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (a name is checked and returned as is)."""
    if isinstance(module, str):
        try:
            model.get_submodule(module)
        except AttributeError as err:
            raise PatchlabValueError(f"the model has no module {module!r}") from err
        return module
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise PatchlabValueError(f"{type(module).__name__} is not a module of this {type(model).__name__}")


def execution_device(model: nn.Module, module: str | nn.Module = "") -> torch.device:
    """The device ``module`` (a submodule of ``model`` or its dotted name; default the model itself) computes on.

    Under a device map this is the ``execution_device`` of the nearest Accelerate hook on the module or one of
    its ancestors (an offloaded module computes on the map's main device, not on ``"cpu"``/``"disk"`` where its
    weights are stored); without hooks it is the device of the module's first non-meta parameter or buffer, then
    of the model's.

    Raises:
        PatchlabValueError: ``module`` is not part of ``model``, or no device can be found (every tensor on ``meta``
            and no hook).
    """
    for level in _ancestors(model, _module_name(model, module)):
        for hook in _hooks(level):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        for tensor in (*level.parameters(), *level.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    raise PatchlabValueError("cannot tell where the model runs: all its tensors are on the meta device and no "
                             "Accelerate hook names an execution device")


def input_device(model: PreTrainedModel) -> torch.device:
    """The execution device of ``model``'s input embedding: where token ids must be before a forward pass."""
    return execution_device(model, model.get_input_embeddings())


def parameter_value(model: nn.Module, name: str) -> torch.Tensor:
    """The values of parameter or buffer ``name`` (e.g. ``"model.layers.3.mlp.down_proj.weight"``), on the
    execution device of the module that owns it, without gradient.

    An offloaded tensor (on ``meta`` in the model) is read from the ``weights_map`` of the Accelerate hook that
    loads it at forward time (the CPU copy, or the memory-mapped file on disk); others are returned as they are,
    moved to the execution device when they sit elsewhere.

    Raises:
        PatchlabValueError: no such tensor, or an offloaded tensor that no hook knows.
    """
    owner, _, leaf = name.rpartition(".")
    try:
        tensor = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
    except AttributeError as err:
        raise PatchlabValueError(f"the model has no parameter or buffer {name!r}") from err
    device = execution_device(model, owner)
    if tensor.device.type != "meta":
        return tensor.detach().to(device)
    parts = owner.split(".") if owner else []
    for depth in range(len(parts), -1, -1):
        level = model.get_submodule(".".join(parts[:depth]))
        key = ".".join([*parts[depth:], leaf])
        for hook in _hooks(level):
            weights = getattr(hook, "weights_map", None)
            if weights is not None and key in weights:
                return weights[key].detach().to(device)
    raise PatchlabValueError(f"{name} is on the meta device and no Accelerate hook holds its weights")


def is_dispatched(model: nn.Module) -> bool:
    """True when ``model`` was placed with a device map (it carries ``hf_device_map`` or Accelerate hooks)."""
    return bool(getattr(model, "hf_device_map", None)) or any(_hooks(m) for m in model.modules())


def offloads(device_map: Mapping[str, Any]) -> set[str]:
    """The offload locations (``"cpu"``, ``"disk"``) a device map uses."""
    return {str(d) for d in device_map.values()} & set(OFFLOAD_LOCATIONS)


def resolve_device_map(model: PreTrainedModel, device_map: DeviceMap, *, max_memory: Mapping[Any, Any] | None = None,
                       dtype: torch.dtype | None = None, share: int = 1) -> dict[str, Any]:
    """A device map ``{module name: device}`` for ``model`` (real or on the ``meta`` device).

    ``device_map="auto"`` places the model as ``from_pretrained(device_map="auto")`` does (Accelerate's
    ``get_balanced_memory`` over the GPUs, then ``infer_auto_device_map``, no decoder layer split), within
    ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}``; default: what the devices have free), each budget divided
    by ``share``: the two models of a pair use ``share=2`` and then the same map, so layer ``i`` of both sits on
    the same device. A dict is checked and returned as is.

    Raises:
        PatchlabValueError: an unknown device map string; a dict that is empty, names modules the model lacks or
            leaves a parameter without a device.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if isinstance(device_map, Mapping):
        if not device_map:
            raise PatchlabValueError("device_map is empty: map module names to devices, e.g. {'': 0}")
        for name in device_map:
            _module_name(model, name)
        prefixes = tuple(f"{name}." for name in device_map if name)
        orphans = [n for n, _ in model.named_parameters() if "" not in device_map and not n.startswith(prefixes)]
        if orphans:
            raise PatchlabValueError(f"the device map gives no device to {len(orphans)} parameter(s), e.g. "
                                     f"{orphans[0]!r}: map their module (or one above it)")
        return dict(device_map)
    if device_map != "auto":
        raise PatchlabValueError(f"device_map must be 'auto' or a dict {{module name: device}}, got {device_map!r} "
                                 "(for a single device use device=...)")
    budget = {k: v // share for k, v in get_max_memory(dict(max_memory) if max_memory else None).items()}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    return dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))


def check_offload_folder(device_map: Mapping[str, Any], offload_folder: str | os.PathLike | None) -> None:
    """Raise :class:`PatchlabValueError` when ``device_map`` sends modules to ``"disk"`` but no folder is given."""
    if "disk" in offloads(device_map) and offload_folder is None:
        disk = [name for name, d in device_map.items() if str(d) == "disk"]
        raise PatchlabValueError(f"the device map offloads {len(disk)} module(s) to disk (e.g. {disk[0]!r}): pass "
                                 "offload_folder=... (a directory for their weights)")


def dispatch(model: PreTrainedModel, device_map: Mapping[str, Any], *,
             offload_folder: str | os.PathLike | None = None) -> PreTrainedModel:
    """Place an in-memory model by ``device_map`` with Accelerate's ``dispatch_model`` (modules mapped to
    ``"disk"`` have their weights written to ``offload_folder``); returns the model, with ``hf_device_map`` set.

    Raises:
        PatchlabValueError: the model is already dispatched, or the map offloads to disk without a folder.
    """
    from accelerate import dispatch_model

    if is_dispatched(model):
        raise PatchlabValueError("the model is already placed with a device map; pass it without device_map=")
    check_offload_folder(device_map, offload_folder)
    folder = None if offload_folder is None else str(Path(offload_folder).expanduser())
    return dispatch_model(model, device_map=dict(device_map), offload_dir=folder)
