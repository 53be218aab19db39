"""PEFT adapters (LoRA and the other ``peft`` tuners) as checkpoints: a directory holding ``adapter_config.json``
stands for its base model plus the adapter, merged into ordinary weights.

``peft`` is an optional dependency (``pip install 'patchlab[peft]'``), imported only when an adapter is loaded.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError
from transformers import PreTrainedModel

from patchlab.errors import MissingDependencyError, PatchlabFileError, PatchlabValueError
from patchlab.pair.hub import hub_reachable, is_hub_id
from patchlab.pair.weights import check_safetensors

#: The file that marks a directory as a PEFT adapter.
ADAPTER_CONFIG = "adapter_config.json"

class AdapterBaseWarning(UserWarning):
    """An adapter is merged onto another base model than the one its ``adapter_config.json`` names."""


#: The files an adapter's weights may be stored in, in the order they are looked for on the hub.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(spec: Any) -> bool:
    """True when ``spec`` is a path to a directory holding a PEFT ``adapter_config.json``."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    path = Path(spec).expanduser()
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _hub_file(repo_id: str, filename: str, offline: bool) -> str | None:
    """The local path of ``filename`` of hub repository ``repo_id`` (downloaded, or from the local hub cache only
    when ``offline``), or ``None`` when the repository does not have it or cannot be reached."""
    try:
        return hf_hub_download(repo_id, filename, local_files_only=offline)
    except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, OSError):
        return None


def local_adapter(spec: Any) -> Path | None:
    """The local directory of a PEFT adapter: ``spec`` itself when it is a directory holding ``adapter_config.json``
    (:func:`is_adapter`), the local hub snapshot of a hub id whose repository holds one (its config and weights
    downloaded, or read from the local hub cache when the hub does not answer or in offline mode), else ``None``."""
    if is_adapter(spec):
        return Path(spec).expanduser()
    if not isinstance(spec, str) or Path(spec).expanduser().exists() or not is_hub_id(spec):
        return None
    offline = not hub_reachable()
    config = _hub_file(spec, ADAPTER_CONFIG, offline)
    if config is None:
        return None
    if not any(_hub_file(spec, name, offline) for name in ADAPTER_WEIGHTS):
        raise PatchlabFileError(f"the hub adapter {spec!r} has an {ADAPTER_CONFIG} but no weights "
                                f"({' or '.join(ADAPTER_WEIGHTS)}) could be fetched")
    return Path(config).parent


def adapter_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """The ``base_model_name_or_path`` an adapter was trained on (a hub id or a path), or ``None`` if unnamed.

    Raises:
        PatchlabFileError: the adapter config is missing or not valid JSON.
    """
    path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PatchlabFileError(f"{path} is not a readable PEFT adapter config: {err}") from err
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def same_checkpoint(name: str | None, spec: Any) -> bool:
    """True when the checkpoint ``name`` (an adapter's ``base_model_name_or_path``) is ``spec``: the same string,
    the same existing directory, or the path an in-memory model was loaded from."""
    other = getattr(spec, "name_or_path", None) if isinstance(spec, PreTrainedModel) else spec
    if not name or not isinstance(other, (str, os.PathLike)) or not str(other):
        return False
    if name == str(other):
        return True
    a, b = Path(name).expanduser(), Path(other).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise MissingDependencyError("loading a PEFT adapter needs the peft library: pip install 'patchlab[peft]'"
                                     ) from err
    return peft


def merge_adapter(base: PreTrainedModel, adapter_dir: str | os.PathLike) -> PreTrainedModel:
    """``base`` with the adapter in ``adapter_dir`` applied and merged into its weights (``peft``'s
    ``PeftModel.from_pretrained(...).merge_and_unload()``): an ordinary ``PreTrainedModel`` whose modules are the
    base model's own (no LoRA layer left), so every site and hook sees plain ``nn.Linear`` / ``Conv1D`` weights
    ``W + ΔW``. ``base`` itself is modified (pass a copy to keep it).

    Raises:
        MissingDependencyError: ``peft`` is not installed.
        PatchlabFileError: the adapter's weights file is truncated or corrupt (named).
        PatchlabValueError: ``base`` is already placed with a device map (merge before dispatching), or the
            adapter does not fit it (other module names or shapes).
    """
    peft = _peft()
    from patchlab.pair.placement import is_dispatched

    if is_dispatched(base):
        raise PatchlabValueError("the base model of an adapter must not be dispatched with a device map yet: the "
                                 "adapter is merged first, then the merged model is placed")
    try:
        with warnings.catch_warnings():  # peft's own deprecation notices about transformers internals
            warnings.simplefilter("ignore", FutureWarning)
            merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except SafetensorError as err:
        check_safetensors(Path(adapter_dir).expanduser(), f"the adapter {str(adapter_dir)!r}")
        raise PatchlabFileError(f"could not load the adapter {str(adapter_dir)!r}: {err}") from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise PatchlabValueError(f"could not apply the adapter {str(adapter_dir)!r} to its base model "
                                 f"({type(base).__name__}): {err}") from err
    return merged.eval()
