"""Unlearning methods as a registry: one file per method in this package, each defining ``METHOD``.

A :class:`Method` owns everything patchlab knows about one method: its objective (``loss``, for the fine-tuning
methods run by :func:`patchlab.unlearning.unlearn`) or its ``apply`` function (for the editing baselines), a
frozen settings dataclass whose fields carry the defaults and whose docstring states their units, its data
needs (:class:`Needs`: a retain set? the frozen reference? refusals?) and its three method-sweep strengths. The
trainer, ``analyses/unlearn.py``'s flags (:func:`add_settings_args`), the method sweep's grid and the toy-model
cache all read the registry, so adding a method is one new file here plus its tests (the toy world trains a method
it has no tuned settings for with its generic toy recipe, :data:`patchlab.toy.cache.TOY_TRAINING`)::

    # patchlab/unlearning/methods/my_method.py
    @dataclass(frozen=True)
    class Settings:
        '''Attributes:
            beta: inverse temperature (per nat).'''
        beta: float = 0.1

    def loss(step: Step, s: Settings) -> torch.Tensor:
        return -s.beta * step.nll(step.forget)

    METHOD = Method(name="my_method", kind="finetune", settings=Settings, summary="-β·NLL(f)", loss=loss,
                    sweep=({"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}))

Methods defined elsewhere join with :func:`register_method`. Built-in files are imported on first use of the
registry; modules whose name starts with ``_`` are shared helpers, not methods. Built-in files import torch only
inside the functions that compute (their type hints under ``TYPE_CHECKING``), so listing the registry and its
settings, as a script's ``--help`` does, never loads torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from patchlab.errors import PatchlabValueError
from patchlab.registry import Registry

if TYPE_CHECKING:
    import torch

KINDS = ("finetune", "editing")
#: What a method needs from the frozen starting model: nothing, only sequence log-probabilities of the fixed
#: forget set (and of preferred answers), which can be precomputed, or the model itself during training.
REFERENCE_NEEDS = ("none", "logprobs", "model")


@dataclass(frozen=True)
class Needs:
    """The data a method needs for given settings.

    Attributes:
        retain: a retain set.
        reference: ``"none"``, ``"logprobs"`` (sequence log-probabilities of the forget set and of ``refusals``
            under the starting model: computed once before training by default) or ``"model"`` (the frozen
            starting model itself, e.g. for logits or activations on retain batches).
        refusals: preferred answers paired with every forget example (DPO); empty when none.
    """

    retain: bool = False
    reference: Literal["none", "logprobs", "model"] = "none"
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_NEEDS:
            raise PatchlabValueError(f"Needs.reference must be one of {', '.join(REFERENCE_NEEDS)}, "
                                     f"got {self.reference!r}")


@dataclass(frozen=True)
class Method:
    """One unlearning method.

    Attributes:
        name: registry key, e.g. ``"npo"``.
        kind: ``"finetune"`` (an objective :func:`patchlab.unlearning.unlearn` minimises) or ``"editing"``
            (a closed-form weight edit, applied by ``apply``).
        settings: a dataclass of the method's own settings, every field with a default; its docstring's
            ``Attributes:`` section documents each field with its unit (read by :func:`field_docs` for ``--help``).
        summary: the objective or procedure in one line (help texts, README).
        needs: the data needs, a :class:`Needs` or a function of the settings returning one.
        loss: ``loss(step, settings) -> scalar`` (fine-tuning): the objective of one micro-batch
            (:class:`patchlab.unlearning.losses.Step`), minimised.
        setup: ``setup(model, settings, seed) -> state`` (fine-tuning, optional): per-run state made once before
            training (``step.state``), e.g. a random direction.
        trainable: ``trainable(model, settings) -> parameter names`` (fine-tuning, optional): the only
            parameters the method updates (default: all, or the weight mask's).
        apply: ``apply(model, tokenizer, requests, settings, *, cov_texts, template, progress) -> model``
            (editing): edit ``model`` in place so it forgets the :class:`patchlab.unlearning.editing.EditRequest`\\ s.
        sweep: the method sweep's strengths, weakest first (keyword arguments of
            :func:`patchlab.unlearning.unlearn` or of the settings).
    """

    name: str
    kind: Literal["finetune", "editing"]
    settings: type
    summary: str
    needs: Needs | Callable[[Any], Needs] = Needs()
    loss: Callable[..., torch.Tensor] | None = None
    setup: Callable[..., Any] | None = None
    trainable: Callable[..., Sequence[str]] | None = None
    apply: Callable[..., Any] | None = None
    sweep: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise PatchlabValueError(f"a method name is lowercase letters, digits and '_', got {self.name!r}")
        if self.kind not in KINDS:
            raise PatchlabValueError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.settings, type) and dataclasses.is_dataclass(self.settings)):
            raise PatchlabValueError(f"method {self.name!r}: settings must be a dataclass type")
        missing = [f.name for f in dataclasses.fields(self.settings)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise PatchlabValueError(f"method {self.name!r}: settings {missing} have no default")
        needed = "loss" if self.kind == "finetune" else "apply"
        if getattr(self, needed) is None:
            raise PatchlabValueError(f"method {self.name!r} of kind {self.kind!r} needs {needed}=")
        object.__setattr__(self, "sweep", tuple(dict(s) for s in self.sweep))

    @property
    def setting_names(self) -> tuple[str, ...]:
        """The names of the method's own settings."""
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def make_settings(self, given: Mapping[str, Any] | None = None) -> Any:
        """The settings dataclass from ``given`` (missing fields take their defaults), validated by it.

        Raises:
            PatchlabValueError: an unknown setting (the message lists the valid ones), or an invalid value.
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.setting_names))
        if unknown:
            valid = ", ".join(self.setting_names) or "none"
            raise PatchlabValueError(f"method {self.name!r} has no setting {', '.join(map(repr, unknown))}; "
                                     f"its settings: {valid}")
        return self.settings(**given)

    def data_needs(self, settings: Any) -> Needs:
        """The :class:`Needs` of this method under ``settings`` (an instance of :attr:`settings`)."""
        return self.needs(settings) if callable(self.needs) else self.needs


# ----------------------------------------------------------------------------------------------- registry

def _check_method(name: str, method: Any) -> None:
    if not isinstance(method, Method):
        raise PatchlabValueError(f"register_method takes a Method, got {type(method).__name__}")


#: Every registered unlearning method by name: the ``METHOD`` of each module of this package (found on first use;
#: modules whose name starts with ``_`` are helpers), then those added by :func:`register_method`.
UNLEARNING_METHODS: Registry[Method] = Registry("unlearning method", package=__name__, attribute="METHOD",
                                                check=_check_method, strict=True)


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to :data:`UNLEARNING_METHODS` (under ``method.name``); returns it.

    Raises:
        PatchlabValueError: not a :class:`Method`, or the name is taken and ``overwrite`` is false.
    """
    _check_method("", method)
    return UNLEARNING_METHODS.register(method, replace=overwrite)


def methods(kind: str | None = None) -> tuple[Method, ...]:
    """Registered methods (of ``kind`` if given): fine-tuning methods first, then editing, each by name."""
    if kind is not None and kind not in KINDS:
        raise PatchlabValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ordered = sorted(UNLEARNING_METHODS.values(), key=lambda m: (KINDS.index(m.kind), m.name))
    return tuple(m for m in ordered if kind is None or m.kind == kind)


def method_names(kind: str | None = None) -> tuple[str, ...]:
    """Names of :func:`methods`."""
    return tuple(m.name for m in methods(kind))


def get_method(name: str, kind: str | None = None) -> Method:
    """The registered method ``name``.

    Raises:
        PatchlabValueError: unknown name (the message lists the known ones), or a method of another kind.
    """
    if name not in UNLEARNING_METHODS:
        raise PatchlabValueError(f"unknown unlearning method {name!r}; choose from {', '.join(method_names(kind))}")
    method = UNLEARNING_METHODS[name]
    if kind is not None and method.kind != kind:
        raise PatchlabValueError(f"{name!r} is an {method.kind} method, not a {kind} one; {kind} methods: "
                                 f"{', '.join(method_names(kind))}")
    return method


# ----------------------------------------------------------------------------------------------- settings


def lr_sweep(*lrs: float, epochs: int = 2, batch_size: int = 8) -> tuple[dict[str, Any], ...]:
    """Method-sweep strengths of a fine-tuning method: ``epochs`` epochs of ``batch_size`` at each learning rate."""
    return tuple({"lr": lr, "epochs": epochs, "batch_size": batch_size} for lr in lrs)


def require_positive(settings: Any, *names: str) -> None:
    """Raise :class:`PatchlabValueError` unless each named field of ``settings`` is a number > 0."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PatchlabValueError(f"{name} must be > 0, got {value!r}")


def require_non_negative(settings: Any, *names: str) -> None:
    """Raise :class:`PatchlabValueError` unless each named field of ``settings`` is a number >= 0."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PatchlabValueError(f"{name} must be >= 0, got {value!r}")


def freeze_sequence(settings: Any, name: str, item: type, *, optional: bool = False) -> None:
    """Store field ``name`` of a frozen settings dataclass as a tuple of ``item`` (lists from JSON or the CLI
    become tuples); ``None`` stays when ``optional``.

    Raises:
        PatchlabValueError: not a list/tuple of ``item`` (a bare string is not a sequence of strings here).
    """
    value = getattr(settings, name)
    if value is None and optional:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise PatchlabValueError(f"{name} must be a list of {item.__name__}, got {value!r}")
    object.__setattr__(settings, name, tuple(value))


def _attribute_docs(klass: type) -> dict[str, str]:
    """The ``Attributes:`` section of one class's own docstring, as ``{field: text}``."""
    lines = (klass.__dict__.get("__doc__") or "").expandtabs().splitlines()
    stripped = [line.strip() for line in lines]
    if "Attributes:" not in stripped:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    base = None
    for line in lines[stripped.index("Attributes:") + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        base = indent if base is None else base
        if indent < base:
            break
        entry = re.match(r"([\w, ]+):\s*(.*)", line.strip()) if indent == base else None
        if entry:
            current = [n.strip() for n in entry.group(1).split(",")]
            docs.update(dict.fromkeys(current, entry.group(2)))
        else:
            docs.update({name: f"{docs[name]} {line.strip()}" for name in current})
    return docs


def field_docs(settings: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` sections of a settings dataclass's docstring and its
    bases' (Google style: ``name: text``, continuation lines indented deeper; ``a, b: text`` documents both)."""
    docs: dict[str, str] = {}
    for klass in reversed(settings.__mro__):
        docs.update(_attribute_docs(klass))
    return docs


# ----------------------------------------------------------------------------------------------- command line


def _argparse_type(hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a settings field's type hint: numbers and strings, ``bool`` as
    ``--x/--no-x``, tuples as one or more values, ``X | None`` as ``X``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) in (tuple, list, Sequence):
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if hint in (int, float, str):
        return {"type": hint}
    raise PatchlabValueError(f"no command-line form for a setting of type {hint!r}")


def add_field_flag(group: argparse._ActionsContainer, name: str, hint: Any, help: str) -> None:
    """Add ``--name`` (underscores as dashes) for a settings field of type ``hint`` (:func:`_argparse_type`) to a
    parser or argument group, with default ``None`` (unset: the field's default) and ``help``.

    Raises:
        PatchlabValueError: the flag is taken by another option.
    """
    try:
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help.replace("%", "%%"),
                           **_argparse_type(hint))
    except argparse.ArgumentError as err:
        raise PatchlabValueError(f"setting {name!r} clashes with another option: {err}") from err


def given_flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags ``names`` (added by :func:`add_field_flag`) given on the command line: ``{name: value}``."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_settings_args(parser: argparse.ArgumentParser, kind: str = "finetune") -> argparse.ArgumentParser:
    """Add one ``--name`` flag per setting of the registered methods of ``kind`` (settings shared by several
    methods share a flag); default ``None``, meaning the method's default. The help text gives the unit (from
    the settings docstring) and each method's default. Read them back with :func:`settings_from_args`.

    Raises:
        PatchlabValueError: two methods give one setting different types, or a setting's flag is taken.
    """
    fields: dict[str, list[tuple[Method, dataclasses.Field, Any]]] = {}
    for method in methods(kind):
        hints = typing.get_type_hints(method.settings)
        for f in dataclasses.fields(method.settings):
            fields.setdefault(f.name, []).append((method, f, hints[f.name]))
    group = parser.add_argument_group("method settings (default: each method's own)")
    for name, uses in sorted(fields.items()):
        hints = {str(hint) for _, _, hint in uses}
        if len(hints) > 1:
            raise PatchlabValueError(f"setting {name!r} has different types across methods: {sorted(hints)}")
        method, f, hint = uses[0]
        doc = field_docs(method.settings).get(name, "")
        defaults = "; ".join(f"{m.name}: {_default_text(g)}" for m, g, _ in uses)
        add_field_flag(group, name, hint, f"{doc} [{defaults}]")
    parser.set_defaults(_method_settings=tuple(sorted(fields)))
    return parser


def settings_from_args(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The settings flags (:func:`add_settings_args`) given on the command line, as keyword arguments for
    ``method``.

    Raises:
        PatchlabValueError: a flag that is not a setting of ``method`` was given.
    """
    entry = get_method(method)
    given = given_flags(args, getattr(args, "_method_settings", ()))
    foreign = [name for name in given if name not in entry.setting_names]
    if foreign:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in foreign)
        valid = ", ".join(f"--{n.replace('_', '-')}" for n in entry.setting_names) or "none"
        raise PatchlabValueError(f"{flags} is not a setting of method {method!r} (its settings: {valid})")
    return given


__all__ = ["KINDS", "UNLEARNING_METHODS", "REFERENCE_NEEDS", "Method", "Needs", "add_field_flag", "add_settings_args",
           "field_docs", "freeze_sequence", "get_method", "given_flags", "lr_sweep", "method_names", "methods",
           "register_method", "require_non_negative", "require_positive", "settings_from_args"]
