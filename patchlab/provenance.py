"""Provenance of results: which checkpoints (by name and by a content hash of their weights), which patchlab and
library versions, which settings. Every result file records it, and resumable runs key on it, so an overwritten
checkpoint is never mistaken for the one a stored result came from."""

from __future__ import annotations

import json
import os
import platform
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from transformers import GenerationConfig, PreTrainedModel

from patchlab.errors import PatchlabValueError
from patchlab.version import __version__

#: Bytes read per step when hashing tensors or files.
_BLOCK = 1 << 24


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``tensor`` (moved to the CPU block by block) to ``digest``."""
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().reshape(-1)
    if flat.device.type == "meta":
        raise PatchlabValueError(f"tensor {name} has no data (meta device); hash the checkpoint directory instead")
    step = max(1, _BLOCK // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].cpu().contiguous()
        digest.update(chunk.view(torch.uint8).numpy().tobytes() if chunk.numel() else b"")


def weights_digest(source: PreTrainedModel | Mapping[str, torch.Tensor] | str | os.PathLike) -> str:
    """A content hash (xxh3-128, 32 hex digits) of a model's weights.

    ``source``: an in-memory model (its ``state_dict``: names, dtypes, shapes and bytes, in sorted name order),
    a ``{name: tensor}`` mapping, or a checkpoint directory (the bytes of its ``*.safetensors`` files, in sorted
    order; they are not loaded). The same weights in the same dtype always give the same digest; any changed
    weight gives another. A directory and the model loaded from it give different digests (different inputs).

    Raises:
        PatchlabValueError: a directory without safetensors files, or a source of another type.
    """
    digest = xxhash.xxh3_128()
    if isinstance(source, (str, os.PathLike)):
        files = sorted(Path(source).glob("*.safetensors"))
        if not files:
            raise PatchlabValueError(f"{source} holds no .safetensors file to hash")
        for path in files:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
        return digest.hexdigest()
    if isinstance(source, PreTrainedModel):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise PatchlabValueError(f"weights_digest takes a model, a state dict or a checkpoint directory, "
                                 f"got {type(source).__name__}")
    for name in sorted(source):
        _hash_tensor(digest, name, source[name])
    return digest.hexdigest()


def adapter_digest(adapter_weights: str, base_weights: str) -> str:
    """The weights digest of a PEFT adapter merged onto a base model (32 hex digits, xxh3-128): a hash of the
    adapter files' digest and the base weights' digest, so the same adapter on two bases gives two digests."""
    return xxhash.xxh3_128_hexdigest(f"adapter|{adapter_weights}|base|{base_weights}".encode())


def describe_source(spec: Any) -> str:
    """How a checkpoint was given: an absolute path for a local directory, the hub id as typed, or
    ``"in-memory <Class> (<name_or_path>)"`` for a model object."""
    if isinstance(spec, PreTrainedModel):
        origin = getattr(spec.config, "name_or_path", "") or "unnamed"
        return f"in-memory {type(spec).__name__} ({origin})"
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        return str(path.resolve()) if path.exists() else str(spec)
    raise PatchlabValueError(f"a checkpoint is a path, a hub id or a model, got {type(spec).__name__}")


def checkpoint_record(spec: Any, model: PreTrainedModel | None = None) -> dict[str, Any]:
    """``{"source": describe_source(spec), "weights": digest}`` for one checkpoint; the digest is taken from
    ``model`` (the loaded weights) when given, else from ``spec`` itself; a model's digest is memoised
    (:func:`model_digest`)."""
    source = model if model is not None else spec
    digest = model_digest(source) if isinstance(source, PreTrainedModel) else weights_digest(source)
    return {"source": describe_source(spec), "weights": digest}


def environment() -> dict[str, str]:
    """Versions of patchlab, Python, torch and transformers."""
    import transformers

    return {"patchlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def settings_key(*parts: Any) -> str:
    """16 hex digits identifying ``parts`` (JSON-serialisable, e.g. settings and checkpoint records): resumable
    runs compare it to decide whether stored output belongs to the same run."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return xxhash.xxh3_64_hexdigest(text.encode())


#: ``model -> (stamp of its parameters, digest)``; an entry goes with its model, so a later model that reuses the
#: freed one's id and memory is never taken for it.
_DIGESTS: weakref.WeakKeyDictionary[PreTrainedModel, tuple[Any, str]] = weakref.WeakKeyDictionary()


def model_digest(model: PreTrainedModel) -> str:
    """:func:`weights_digest` of an in-memory model, memoised per model object until its weights change (the
    memo is keyed by the object and checked against the data pointers and versions of its parameters)."""
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = _DIGESTS.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = weights_digest(model)
    _DIGESTS[model] = (stamp, digest)
    return digest


#: A file written this recently (nanoseconds) may be rewritten with the same modification time (file-system
#: timestamps can be as coarse as 2 s), so a directory holding one is hashed again on every call.
_RACY_NS = 2_000_000_000

_DIR_DIGESTS: dict[Path, tuple[tuple[tuple[str, int, int, int], ...], str]] = {}


def _file_stamps(files: list[Path]) -> tuple[tuple[str, int, int, int], ...]:
    """``(name, inode, size in bytes, modification time in ns)`` of each of ``files``."""
    return tuple((f.name, (st := f.stat()).st_ino, st.st_size, st.st_mtime_ns) for f in files)


def directory_digest(path: Path) -> str:
    """:func:`weights_digest` of a checkpoint directory, memoised per resolved path until any of its
    ``*.safetensors`` files is added, removed, replaced, resized or modified (its name, inode, size or
    modification time changes); a directory with a file modified less than :data:`_RACY_NS` before hashing
    began is not memoised."""
    root = path.resolve()
    started = time.time_ns()
    stamps = _file_stamps(sorted(root.glob("*.safetensors")))
    cached = _DIR_DIGESTS.get(root)
    if cached is not None and cached[0] == stamps:
        return cached[1]
    digest = weights_digest(root)
    if all(mtime < started - _RACY_NS for *_, mtime in stamps):
        _DIR_DIGESTS[root] = (stamps, digest)
    return digest


def checkpoint_digest(source: str, model: PreTrainedModel | None) -> str:
    """The weights digest of one side of a pair: of its safetensors files when it was given as a local checkpoint
    or adapter directory (the checkpoint's identity, whatever dtype it was loaded in; nothing is loaded; memoised,
    :func:`directory_digest`), else of the in-memory model's weights (:func:`model_digest`)."""
    path = Path(source)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return directory_digest(path)
    if model is None:
        raise PatchlabValueError(f"no weights to hash for {source!r}")
    return model_digest(model)


#: How reference answers are decoded (:func:`patchlab.pair.generation.greedy_continuations`), whatever a
#: checkpoint's ``generation_config.json`` asks for.
GREEDY = {"decoding": "greedy: the argmax token at each step, no sampling, beams, penalties or logits processors",
          "do_sample": False, "num_beams": 1}

#: Generation-config entries of transformers' defaults that do not change which tokens are chosen.
_OUTPUT_KEYS = ("use_cache", "output_scores", "return_dict_in_generate")


def generation_record(model: PreTrainedModel | str | os.PathLike) -> dict[str, Any]:
    """``{**GREEDY, "ignored": {...}}``: how reference answers are generated
    (:func:`patchlab.pair.generation.greedy_continuations`), and the decoding entries of the model's generation
    config (an in-memory model's, or a checkpoint directory's ``generation_config.json``) that differ from
    transformers' defaults and are ignored (sampling, temperature, penalties...; ``{}`` when none), for provenance."""
    if isinstance(model, PreTrainedModel):
        config = model.generation_config
    else:
        folder = Path(model)
        config = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
    defaults = GenerationConfig()._get_default_generation_params()
    ignored = {} if config is None else {k: v for k, v in config.to_dict().items()
                                         if k in defaults and k not in _OUTPUT_KEYS and v not in (None, defaults[k])}
    return {**GREEDY, "ignored": ignored}


def pair_provenance(pair: Any) -> dict[str, Any]:
    """``{"vanilla": {"source", "weights"}, "unlearned": {...}, "generation": ..., "environment": ...}`` of a pair:
    how each checkpoint was given, a content hash of its weights (:func:`checkpoint_digest`), how its greedy answers
    are generated (:func:`generation_record`) and the library versions.

    An unlearned side given as a PEFT adapter also records its ``"adapter_base"`` (how the base was given), and its
    ``"weights"`` hash the adapter files together with the base's weights (:func:`adapter_digest`): the same adapter
    merged onto two bases has two digests, so a resumed run never takes one for the other.

    ``pair``: a :class:`~patchlab.pair.ModelPair` (held in memory or one model at a time), or a ``(vanilla,
    unlearned)`` tuple, each an in-memory model or a local checkpoint directory.

    Raises:
        PatchlabValueError: a tuple side that is neither a model nor a directory holding safetensors files.
    """
    if isinstance(pair, tuple):
        if len(pair) != 2:
            raise PatchlabValueError(f"a pair of checkpoints is (vanilla, unlearned), got {len(pair)} items")
        sides = [(describe_source(spec), spec if isinstance(spec, PreTrainedModel) else None) for spec in pair]
        generation = generation_record(pair[0])
    else:
        models = [pair.model(which) if hasattr(pair, "model") else None for which in ("vanilla", "unlearned")]
        sides = [(source or describe_source(model), model)
                 for source, model in zip(getattr(pair, "sources", ("", "")), models)]
        generation = generation_record(models[0] if models[0] is not None else pair.specs["vanilla"])
    adapter = getattr(pair, "adapter", None)
    out = {which: {"source": source, "adapter_base": adapter["base"], "weights": adapter["weights"]}
           if which == "unlearned" and adapter is not None else {"source": source,
                                                                 "weights": checkpoint_digest(source, model)}
           for which, (source, model) in zip(("vanilla", "unlearned"), sides)}
    return {**out, "generation": generation, "environment": environment()}


def short_name(source: str) -> str:
    """A checkpoint's short display name: the last two path components of a path, a hub id as is."""
    parts = [p for p in str(source).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if str(source).startswith("/") else str(source)
