"""No two public names of patchlab collide: a name means one object everywhere it is public (``from x import NAME``
never silently means something else than in another module)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import defaultdict
from typing import TypeVar

import patchlab

#: Names every registry entry file defines by convention (read through the registry, never imported by name) and
#: the entry points of ``python -m`` scripts.
PER_FILE = ("main", "parse_args")


def _modules() -> list:
    names = ["patchlab", *(m.name for m in pkgutil.walk_packages(patchlab.__path__, "patchlab."))]
    return [importlib.import_module(name) for name in names]


def _entry_file(module) -> bool:
    """A file the probe, unlearning-method or attribution-scorer registry discovers: its names are the registry's, not
    the API's."""
    return any(hasattr(module, entry) for entry in ("PROBE", "METHOD", "SCORER"))


def public_names(module) -> list[str]:
    """``__all__``, else every name without a leading underscore."""
    return list(getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]))


def collisions() -> dict[str, list[list[str]]]:
    """``{name: [[modules holding one object], [modules holding another], ...]}`` for every public name bound to
    more than one object across patchlab's modules."""
    owners: dict[str, dict[int, list[str]]] = defaultdict(dict)
    for module in _modules():
        if _entry_file(module):
            continue
        for name in public_names(module):
            if name in PER_FILE:
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj) or isinstance(obj, TypeVar):
                continue
            owners[name].setdefault(id(obj), []).append(module.__name__)
    return {name: list(objs.values()) for name, objs in sorted(owners.items()) if len(objs) > 1}


def test_no_two_public_names_collide():
    assert collisions() == {}


def test_the_check_sees_a_collision(monkeypatch):
    import patchlab.probes.scoring as scoring

    monkeypatch.setattr(scoring, "References", type("References", (), {}), raising=False)
    assert "References" in collisions()
