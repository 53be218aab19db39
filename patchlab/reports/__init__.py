"""Reports of results: the result protocol and its registry (:mod:`patchlab.reports.results`), every figure
(:mod:`patchlab.reports.figures`) and the conventions result files share.

**Partial results.** A JSON results file that a run rewrites as it goes (after each finished unit of work, so an
interrupted run keeps what it finished) carries ``"partial": true`` until the run has written everything, then
``"partial": false``: build it with :func:`results_record`, read the flag with :func:`is_partial`. Files are
written atomically (:func:`patchlab.io.atomic_write_json`), so a reader sees either the previous or the next
version, never a half-written one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from patchlab.errors import PatchlabValueError
from patchlab.reports import figures

#: The key of the partial-results flag in JSON results files.
PARTIAL = "partial"


def results_record(data: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
    """``data`` with ``"partial": partial`` first (a run's JSON results, finished or not).

    Raises:
        PatchlabValueError: ``data`` is not a mapping or already holds a ``"partial"`` key, or ``partial`` is not a
            bool.
    """
    if not isinstance(data, Mapping) or PARTIAL in data:
        raise PatchlabValueError(f"results must be a mapping without a {PARTIAL!r} key")
    if not isinstance(partial, bool):
        raise PatchlabValueError(f"partial must be True or False, got {partial!r}")
    return {PARTIAL: partial, **data}


def is_partial(data: Mapping[str, Any]) -> bool:
    """Whether a results record (read back from JSON) says its run had not finished.

    Raises:
        PatchlabValueError: ``data`` carries no boolean ``"partial"`` flag.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get(PARTIAL), bool):
        raise PatchlabValueError(f"a results record carries a boolean {PARTIAL!r} flag")
    return data[PARTIAL]


__all__ = ["PARTIAL", "figures", "is_partial", "results_record"]
