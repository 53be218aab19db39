"""Unlearned copies of the toy vanilla model, built with :func:`patchlab.unlearning.unlearn` and cached on disk.

A cached model is one safetensors file under :func:`cache_dir`, named after the concept, the method and a hash
of (settings, forget/retain data, vanilla weights), so changing any of them builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.io import atomic_write
from patchlab.toy.corpus import ConceptRecord, World
from patchlab.unlearning import unlearn
from patchlab.unlearning.methods import method_names


#: The toy world's tuned unlearning settings (keyword arguments of :func:`patchlab.unlearning.unlearn`) per
#: fine-tuning method, tuned so the default concept's target QA accuracy drops to <= 20% while unrelated QA stays
#: >= 80% (see tests/test_toy.py). Forget set: the concept's paragraphs; retain set: every other concept's
#: paragraphs. A method not listed here (e.g. one a plugin registers) gets :data:`TOY_TRAINING`.
TUNED_TOY_SETTINGS: dict[str, dict[str, Any]] = {
    "dpo": {"lr": 3e-3, "epochs": 2, "batch_size": 8},
    "ga": {"lr": 1e-3, "epochs": 2, "batch_size": 8},
    "graddiff": {"lr": 1e-3, "epochs": 5, "batch_size": 8, "retain_weight": 1.0},
    "npo": {"lr": 2e-3, "epochs": 2, "batch_size": 8, "beta": 0.1},
    "npo_kl": {"lr": 2e-3, "epochs": 2, "batch_size": 8},
    "rmu": {"steering_coeff": 100.0, "alpha": 10.0, "epochs": 3, "batch_size": 8, "lr": 5e-3},
    "simnpo": {"lr": 1e-3, "epochs": 2, "batch_size": 8},
}

#: The toy world's training recipe for a fine-tuning method without tuned settings: the toy model's scale needs
#: a larger learning rate than :func:`patchlab.unlearning.unlearn`'s default; the method's own settings keep their
#: defaults.
TOY_TRAINING: dict[str, Any] = {"lr": 1e-3, "epochs": 2, "batch_size": 8}


class _ToySettings(Mapping[str, Mapping[str, Any]]):
    """Read-only live view ``{method: toy settings}`` of the registry's fine-tuning methods."""

    def __getitem__(self, method: str) -> Mapping[str, Any]:
        return toy_method_settings(method)

    def __iter__(self) -> Iterator[str]:
        return iter(toy_methods())

    def __len__(self) -> int:
        return len(toy_methods())


#: Per-method unlearning settings on the toy world (:func:`toy_method_settings` of every fine-tuning method).
METHOD_SETTINGS: Mapping[str, Mapping[str, Any]] = _ToySettings()


def cache_dir() -> Path:
    """Where the toy world's built models are cached: ``$PATCHLAB_CACHE/toy`` when ``PATCHLAB_CACHE`` is set, else
    ``$XDG_CACHE_HOME/patchlab/toy`` when ``XDG_CACHE_HOME`` is an absolute path (the XDG base directory
    specification ignores a relative one), else ``~/.cache/patchlab/toy``. Empty variables count as unset."""
    if os.environ.get("PATCHLAB_CACHE"):
        return Path(os.environ["PATCHLAB_CACHE"]).expanduser() / "toy"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.cache").expanduser()
    return base / "patchlab" / "toy"


def unlearn_data(world: World, concept: str) -> tuple[list[str], list[str]]:
    """(forget, retain) texts: the concept's paragraphs, and every other concept's paragraphs."""
    record = world.record(concept)
    retain = [p for r in world.records if r.concept != concept for p in r.forget_paragraphs]
    return list(record.forget_paragraphs), retain


def toy_methods() -> list[str]:
    """The fine-tuning methods of the registry (the toy world trains every one)."""
    return list(method_names("finetune"))


def toy_method_settings(method: str, strength: float = 1.0) -> dict[str, Any]:
    """The toy-world settings of fine-tuning method ``method``: :data:`TUNED_TOY_SETTINGS`, else
    :data:`TOY_TRAINING`; at ``strength`` s != 1 the learning rate is s times the tuned one (s = 1: the tuned
    settings themselves, unchanged).

    Raises:
        PatchlabValueError: no fine-tuning method of that name (naming the known ones), or a strength that is not a
            finite positive number.
    """
    if method not in toy_methods():
        raise PatchlabValueError(f"unknown toy unlearning method {method!r}; choose from {toy_methods()}")
    check_strength(strength)
    settings = dict(TUNED_TOY_SETTINGS.get(method, TOY_TRAINING))
    if strength != 1:
        settings["lr"] = settings["lr"] * strength
    return settings


def check_strength(strength: float) -> None:
    """Raise :class:`PatchlabValueError` unless ``strength`` (a learning-rate multiple) is a finite positive number."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength < float("inf"):
        raise PatchlabValueError(f"an unlearning strength is a finite positive learning-rate multiple, got "
                                 f"{strength!r}")


def strength_label(method: str, strength: float = 1.0) -> str:
    """The name of ``method`` at ``strength``: the method itself at 1, else ``<method>-x<strength>`` (``npo-x0.5``)."""
    return method if strength == 1 else f"{method}-x{strength:g}"


def cache_key(record: ConceptRecord, method: str, retain: list[str], vanilla_weights: Path, strength: float = 1.0
              ) -> str:
    """16 hex digits of SHA-256 over the method, its settings at ``strength``, the forget/retain texts and the
    vanilla weights."""
    digest = hashlib.sha256()
    spec = {"method": method, "settings": toy_method_settings(method, strength), "forget": record.forget_paragraphs,
            "retain": retain}
    digest.update(json.dumps(spec, sort_keys=True).encode())
    digest.update(Path(vanilla_weights).read_bytes())
    return digest.hexdigest()[:16]


def cached_path(record: ConceptRecord, method: str, retain: list[str], vanilla_weights: Path,
                root: Path | None = None, strength: float = 1.0) -> Path:
    """Where the unlearned weights of (concept, method at ``strength``) for these vanilla weights live in the
    cache."""
    slug = record.concept.lower().replace(" ", "-")
    key = cache_key(record, method, retain, vanilla_weights, strength)
    return (root or cache_dir()) / f"{slug}-{strength_label(method, strength)}-{key}.safetensors"


def build_unlearned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, forget: list[str], retain: list[str],
                    method: str, *, strength: float = 1.0, progress: bool = True) -> PreTrainedModel:
    """Unlearn ``forget`` from ``model`` (updated in place) with ``method``'s toy settings at ``strength``, keeping
    ``retain`` (texts, e.g. from :func:`unlearn_data`)."""
    return unlearn(model, forget, retain, tokenizer=tokenizer, method=method, progress=progress,
                   **toy_method_settings(method, strength)).model


def _cached_state(path: Path, model: PreTrainedModel) -> dict[str, torch.Tensor] | None:
    """The tensors of the cached file ``path`` when they are exactly ``model``'s state (same names, shapes and
    dtypes), else ``None`` after a warning naming the file (it is then rebuilt). ``model`` is left untouched."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    else:
        expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        found = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        if found == expected:
            return state
        problem = "it holds other tensors than the toy model's"
    warnings.warn(f"the cached toy model {path} is unusable: {problem}; rebuilding it", stacklevel=3)
    return None


def load_or_build(vanilla: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World, concept: str,
                  method: str, vanilla_weights: Path, *, strength: float = 1.0, root: Path | None = None,
                  progress: bool = True) -> PreTrainedModel:
    """The cached unlearned model of (concept, method at ``strength``: :func:`toy_method_settings`), built and
    written atomically on first use.

    ``vanilla`` is a fresh copy of the vanilla model; it becomes the unlearned one (weights loaded or trained). A
    cached file that cannot be read (truncated, corrupt, or holding other tensors than the model's) is rebuilt and
    replaced, with a warning naming it.
    """
    toy_method_settings(method, strength)
    record = world.record(concept)
    forget, retain = unlearn_data(world, concept)
    path = cached_path(record, method, retain, vanilla_weights, root, strength)
    if path.is_file():
        state = _cached_state(path, vanilla)
        if state is not None:
            vanilla.load_state_dict(state)
            return vanilla.eval()
    model = build_unlearned(vanilla, tokenizer, forget, retain, method, strength=strength, progress=progress)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"concept": concept, "method": method, "strength": repr(float(strength))}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return model
