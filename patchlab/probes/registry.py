"""The probe registry: one :class:`~patchlab.probes.base.Probe` entry per probe, in report order, and the settings
they run with. Every module of this package that defines ``PROBE`` is a probe (found on first use of
:data:`PROBES`): a new probe is one file; probes defined elsewhere join with :func:`register_probe`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from patchlab.errors import PatchlabValueError
from patchlab.probes.base import COMMON_DEFAULTS, Probe, check_probe_fn
from patchlab.registry import Registry

#: Settings key of the options every probe shares (:data:`patchlab.probes.base.COMMON_DEFAULTS`).
COMMON = "common"

#: Where the report shows the built-in probes; any other probe file follows them, by name.
REPORT_ORDER = ("krs", "logit_lens", "uds", "relearning", "quantization", "behavior")


def _check_probe(name: str, probe: Any) -> None:
    if not isinstance(probe, Probe):
        raise PatchlabValueError(f"register_probe takes a patchlab.probes.Probe, got {type(probe).__name__}")
    if name == COMMON:
        raise PatchlabValueError(f"{COMMON!r} names the shared settings, not a probe: choose another name")
    check_probe_fn(probe.name, probe.run)


def _report_rank(name: str) -> tuple[int, str]:
    return (REPORT_ORDER.index(name) if name in REPORT_ORDER else len(REPORT_ORDER), name)


#: name -> probe, in the order the report shows them: each ``PROBE`` of this package's modules, then the
#: registered ones.
PROBES: Registry[Probe] = Registry("probe", package="patchlab.probes", attribute="PROBE", check=_check_probe,
                                   order=_report_rank)


def register_probe(probe: Probe, *, replace: bool = False) -> Probe:
    """Add ``probe`` to :data:`PROBES` (after the others); returns it.

    Raises:
        PatchlabValueError: not a :class:`Probe`, a ``run`` that lacks a keyword of
            :class:`~patchlab.probes.base.ProbeFn` (``baselines`` included), a name taken (without ``replace=True``)
            or the reserved ``common``.
    """
    _check_probe("", probe)
    return PROBES.register(probe, replace=replace)


def select(probes: Sequence[str] | None) -> list[Probe]:
    """The registry entries named in ``probes`` (all when ``None``), in registry order.

    Raises:
        PatchlabValueError: an empty selection or an unknown name (naming the known ones).
    """
    if probes is None:
        return list(PROBES.values())
    if isinstance(probes, str) or not probes:
        raise PatchlabValueError(f"probes must be a non-empty list of names from {list(PROBES)}")
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise PatchlabValueError(f"unknown probe(s) {unknown}; choose from {list(PROBES)}")
    return [p for name, p in PROBES.items() if name in probes]


def resolve_settings(probes: Sequence[Probe], settings: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """``{"common": {...}, probe name: {...}}``: the defaults of the shared options and of each probe, overridden by
    ``settings`` (same shape, any subset; e.g. ``{"relearning": {"lr": 1e-3}}``).

    Raises:
        PatchlabValueError: a section that is neither ``common`` nor a selected probe, or an unknown option.
    """
    resolved = {COMMON: copy.deepcopy(COMMON_DEFAULTS), **{p.name: copy.deepcopy(dict(p.defaults)) for p in probes}}
    for section, values in (settings or {}).items():
        if section not in resolved:
            raise PatchlabValueError(f"unknown settings section {section!r}; choose from {list(resolved)}")
        if not isinstance(values, Mapping):
            raise PatchlabValueError(f"settings[{section!r}] must be a mapping of options")
        unknown = sorted(set(values) - set(resolved[section]))
        if unknown:
            raise PatchlabValueError(f"unknown {section} option(s) {unknown}; choose from {sorted(resolved[section])}")
        resolved[section].update(copy.deepcopy(dict(values)))
    return resolved


def probe_settings(resolved: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, Any]:
    """The flat settings one probe receives: the shared options, then its own."""
    return {**resolved[COMMON], **resolved.get(name, {})}
