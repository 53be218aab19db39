"""One registry mechanism for every extensible axis of patchlab (metrics, probes, unlearning methods, attribution
scorers): a named, ordered mapping ``name -> entry`` that refuses duplicates and unknown names with a message listing
the known ones, and can fill itself by importing every module of a package folder (one file = one entry)::

    SCORERS = Registry("attribution scorer")
    SCORERS.register("magnitude", magnitude)         # or SCORERS["magnitude"] = magnitude (replacing)
    SCORERS.get("wagle")                             # PatchlabValueError naming the known scorers when unknown

    PROBES = Registry("probe", package="patchlab.probes", attribute="PROBE")   # each module's PROBE, on first use

Entries registered by user code join the same registries; scripts import such code with ``--plugin MODULE``
(:func:`import_plugins`) before they build their parser, so the new names appear in ``--help`` and in choices.

This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from patchlab.errors import PatchlabValueError

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """An ordered ``name -> entry`` mapping of one kind of entry (``what``, e.g. ``"metric"``).

    With ``package`` it discovers its built-in entries on first use: it imports every module of that package
    whose name does not start with ``_`` and registers the module's ``attribute`` (under ``name_of(entry)``),
    in the order of the sort key ``order(name)`` (default: by name). Modules without that attribute are skipped
    (helpers), unless ``strict``.

    ``registry[name] = entry`` replaces silently (as ``monkeypatch.setitem`` needs); :meth:`register` refuses a
    taken name unless ``replace=True``.
    """

    def __init__(self, what: str, *, package: str | None = None, attribute: str | None = None,
                 name_of: Callable[[T], str] = lambda entry: entry.name,  # type: ignore[attr-defined]
                 check: Callable[[str, T], None] | None = None, strict: bool = False,
                 order: Callable[[str], Any] | None = None) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._package = package
        self._attribute = attribute
        self._name_of = name_of
        self._check = check
        self._strict = strict
        self._order = order
        self._discovered = package is None

    # --------------------------------------------------------------------------------------- discovery
    def discover(self) -> None:
        """Import the package's modules once and register each one's ``attribute``, ahead of the entries already
        registered (an entry registered earlier under a built-in's name wins, in the built-in's place).

        Raises:
            PatchlabValueError: ``strict`` and a module lacks ``attribute``.
        """
        if self._discovered:
            return
        self._discovered = True  # set first: a module may register itself while it is imported
        try:
            found = self._found_entries()
        except BaseException:
            self._discovered = False
            raise
        ordered = sorted(found, key=self._order) if self._order is not None else list(found)
        self._entries = {**{name: found[name] for name in ordered}, **self._entries}

    def _found_entries(self) -> dict[str, T]:
        """``{name: entry}`` of the package's modules (see :meth:`discover`)."""
        package = importlib.import_module(self._package)  # type: ignore[arg-type]
        found: dict[str, T] = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            entry = getattr(module, self._attribute, None)  # type: ignore[arg-type]
            if entry is None:
                if self._strict:
                    raise PatchlabValueError(f"{module.__name__} defines no {self._attribute} ({self.what})")
                continue
            name = self._name_of(entry)
            if self._check is not None:
                self._check(name, entry)
            found[name] = entry
        return found

    # --------------------------------------------------------------------------------------- registration
    def register(self, entry: T, name: str | None = None, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` (default ``name_of(entry)``), after the others; returns it.

        Raises:
            PatchlabValueError: the name is taken by another entry and ``replace`` is false, or the registry's
                check refuses the entry.
        """
        self.discover()
        name = self._name_of(entry) if name is None else name
        if not isinstance(name, str) or not name:
            raise PatchlabValueError(f"a {self.what} name is a non-empty string, got {name!r}")
        if self._check is not None:
            self._check(name, entry)
        if name in self._entries and self._entries[name] is not entry and not replace:
            raise PatchlabValueError(f"a {self.what} named {name!r} is already registered; pass replace=True to "
                                     f"replace it (registered: {', '.join(self._entries)})")
        self._entries[name] = entry
        return entry

    def get(self, name: str, default: Any = ...) -> T:  # type: ignore[override]
        """The entry ``name``; ``default`` when given and unknown.

        Raises:
            PatchlabValueError: unknown name without ``default`` (the message lists the known ones).
        """
        self.discover()
        if name in self._entries:
            return self._entries[name]
        if default is not ...:
            return default
        raise PatchlabValueError(f"unknown {self.what} {name!r}; choose from {', '.join(self._entries) or 'none'}")

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (built-ins first, by module name)."""
        self.discover()
        return tuple(self._entries)

    # --------------------------------------------------------------------------------------- mapping
    def __getitem__(self, name: str) -> T:
        self.discover()
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(entry, name, replace=True)

    def __delitem__(self, name: str) -> None:
        self.discover()
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self.names())})"


def _import_file(path: Path) -> ModuleType:
    """Import the Python file ``path`` (absolute) once, as module ``patchlab_plugin_<stem>_<digest of path>``; a
    second call returns it."""
    name = f"patchlab_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_plugins(modules: Iterable[str]) -> list[ModuleType]:
    """Import each plugin of ``modules``, a dotted module name on ``sys.path`` (e.g. ``my_lab.metrics``) or the path
    of a ``.py`` file, so the entries it registers (:func:`patchlab.register_metric`, ``register_method``,
    ``register_probe``, ``register_scorer``, ...) join patchlab's registries; returns the modules.

    Raises:
        PatchlabValueError: a plugin cannot be found or imported (naming it and why).
    """
    loaded = []
    for name in modules:
        try:
            if name.endswith(".py"):
                if not Path(name).is_file():
                    raise PatchlabValueError(f"--plugin {name}: no such file")
                loaded.append(_import_file(Path(name).resolve()))
            else:
                loaded.append(importlib.import_module(name))
        except ImportError as err:
            raise PatchlabValueError(f"--plugin {name}: cannot import it ({err}); give a module name importable "
                                     "from PYTHONPATH or the path of a .py file") from err
    return loaded


def lazy_exports(namespace: dict[str, Any], exports: Mapping[str, tuple[str, str | None]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` of a package whose names load on first use (PEP 562), so importing it stays light.

    ``namespace`` is the package's ``globals()``; ``exports`` maps each public name to ``(module, attribute)``
    (attribute ``None``: the module itself). Any other submodule of the package loads on first use too. A loaded
    value is kept in ``namespace``, so it loads once; an unknown name raises ``AttributeError``.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in exports:
            module_name, attribute = exports[name]
            module = importlib.import_module(module_name)
            value = module if attribute is None else getattr(module, attribute)
        elif name in {info.name for info in pkgutil.iter_modules(namespace["__path__"])}:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


__all__ = ["Registry", "import_plugins", "lazy_exports"]
