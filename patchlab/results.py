"""The one result protocol, and the registry of result types.

Every result patchlab produces (a patching sweep, a parameter diff, attribution densities, a method sweep, an
audit) is a :class:`Result`: ``to_frame()`` gives its long table, ``save(path)`` / ``load(path)`` its JSON file
(written atomically), ``figure(...)`` its main interactive figure and ``write_report(dir)`` all of them into an
output directory (claimed first: :class:`patchlab.io.OutputDir`). A result type is one class registered with
:func:`register_result`; :func:`load_result` reads any result file back by its format tag.

**Figures.** Drawing belongs to the presentation layer (:mod:`patchlab.reports`), above every result type: a result's
:meth:`Result.figure` calls the figure function registered for its type with :func:`register_figure`, and
``import patchlab`` (which any ``import patchlab.x`` runs first) loads that layer, so every built-in result draws. The
audit's probes are drawn the same way, by probe name.

**Partial results.** A JSON results file that a run rewrites as it goes (after each finished unit of work, so an
interrupted run keeps what it finished) carries ``"partial": true`` until the run has written everything, then
``"partial": false``: build it with :func:`results_record`, read the flag with :func:`is_partial`. Files are
written atomically (:func:`patchlab.io.atomic_write_json`), so a reader sees either the previous or the next
version, never a half-written one.

The result types: :class:`patchlab.patching.result.PatchResult` and ``PatchComparison`` (patching sweeps),
:class:`patchlab.analysis.paramdiff.ParamDiff` (parameter diffs), :class:`patchlab.unlearning.density.DensityReport`
(mask densities), :class:`patchlab.analysis.behavior.BehaviorResult` (behavioural tests),
:class:`patchlab.analysis.method_sweep.SweepResult` (the method sweep) and :class:`patchlab.probes.report.AuditReport`
(the residual-knowledge audit).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
from pydantic import BaseModel

from patchlab.errors import PatchlabValueError
from patchlab.io import (OutputDir, atomic_write_json, atomic_write_text, output_dir, plotlyjs_name, read_json,
                         write_csv, write_html, write_plotlyjs)
from patchlab.provenance import short_name
from patchlab.schema import validate

R = TypeVar("R", bound="Result")

_RESULT_TYPES: dict[str, type[Result]] = {}
#: Figure functions by what they draw: a :class:`Result` subclass or a probe's name (see :func:`register_figure`).
_FIGURES: dict[type | str, Callable[..., Any]] = {}
#: The presentation package, loaded by name (as a plugin, not imported by this foundation module) the first time a
#: figure is asked for that nothing registered yet: its modules register the built-in drawings.
PRESENTATION = "patchlab.reports"
#: The library's modules that define the built-in result types, loaded by name (as :data:`PRESENTATION`, not
#: imported by this foundation module) the first time a file's format tag is not registered yet, so
#: :func:`load_result` reads any patchlab file in a fresh process.
RESULT_MODULES = ("patchlab.patching.result", "patchlab.probes.report", "patchlab.meta_evaluation",
                  "patchlab.unlearning.density", "patchlab.analysis.behavior", "patchlab.analysis.paramdiff",
                  "patchlab.analysis.method_sweep")
#: The key of the partial-results flag in JSON results files.
PARTIAL = "partial"


class Result:
    """Base class of every result type.

    Subclasses set :attr:`kind` (the output-directory kind and the default file stem), :attr:`format` (the JSON
    format tag) and :attr:`schema` (the pydantic model of the JSON file, :mod:`patchlab.schema`), and
    implement :meth:`to_dict`, :meth:`from_dict`, :meth:`to_frame` and :meth:`figure`; they may add tables
    (:meth:`tables`) and figures (:meth:`figures`) to the report.
    """

    kind: ClassVar[str] = "result"
    #: The report's default file stem (``{stem}.json``...) when it is not :attr:`kind`.
    stem: ClassVar[str | None] = None
    format: ClassVar[str] = "patchlab.Result/1"
    #: The pydantic model of the JSON file :meth:`save` writes (:meth:`to_dict` and the format tag), checked by
    #: :meth:`load` before :meth:`from_dict` builds anything.
    schema: ClassVar[type[BaseModel] | None] = None
    #: Older format tags :meth:`load` still reads, each with the schema of its files.
    legacy_formats: ClassVar[Mapping[str, type[BaseModel]]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Every number of the result, JSON-serialisable."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The result :meth:`to_dict` describes."""
        raise NotImplementedError

    def to_frame(self, **kwargs: Any) -> pd.DataFrame:
        """The result as one long table."""
        raise NotImplementedError

    def figure(self, **kwargs: Any) -> Any:
        """The main interactive plotly figure: the figure function registered for this type
        (:func:`register_figure`), called with the result and ``kwargs``."""
        return figure_function(type(self))(self, **kwargs)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The CSV tables of the report, by file stem (default: :meth:`to_frame` under :attr:`kind`)."""
        return {self.kind: self.to_frame()}

    def figures(self, **kwargs: Any) -> dict[str, Any]:
        """The HTML pages of the report, by file stem (default: :meth:`figure` under :attr:`kind`); ``kwargs`` go
        to the figure functions. A page is a plotly figure (written to load the plotly.js bundle shared by the
        report's pages, :func:`patchlab.io.write_html`) or a complete self-contained HTML page (a ``str``)."""
        return {self.kind: self.figure(**kwargs)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON, atomically (temp file + rename)."""
        return atomic_write_json(path, {"format": self.format, **self.to_dict()})

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a result written by :meth:`save`, checked against its :attr:`schema` first.

        Raises:
            PatchlabFileError: no such file. PatchlabValueError: not JSON, not a result of this type, or not
                following its schema (the message names the first bad field).
        """
        data = read_json(path, what=f"{cls.kind} result file")
        tag = _format_tag(data, path)
        if tag not in (cls.format, *cls.legacy_formats):
            raise PatchlabValueError(f"{path} is not a patchlab {cls.__name__} file (format {tag!r})")
        return cls._from_file(data, path)

    @classmethod
    def _from_file(cls: type[R], data: dict[str, Any], path: str | os.PathLike) -> R:
        """The result a file's JSON object (of one of this type's formats) describes, once it follows its schema."""
        tag = data["format"]
        validate(cls.legacy_formats.get(tag, cls.schema), data, path, f"patchlab {cls.__name__} file ({tag})")
        return cls.from_dict(data)

    def write_report(self, out_dir: str | os.PathLike | OutputDir, *, name: str | None = None,
                     overwrite: bool = False, **figure_kwargs: Any) -> dict[str, Path]:
        """Write ``{name}.json`` (:meth:`save`), a CSV per table (:meth:`tables`) and an HTML page per figure
        (:meth:`figures`) into ``out_dir``, each atomically; returns the paths by file name (the plotly.js bundle the
        pages share is written beside them and recorded in the directory's manifest, not returned). ``name``
        defaults to :attr:`stem` or :attr:`kind`. ``out_dir`` is claimed as a :attr:`kind` output
        (:class:`patchlab.io.OutputDir`): an earlier one is replaced only with ``overwrite=True``; an already
        claimed ``OutputDir`` (a resumable run's, or another result's: e.g. a sweep's comparison written beside it,
        the pages sharing one plotly.js file) is used as it is.

        ``figure_kwargs`` go to :meth:`figures` (the figures are built before anything is written, so a bad
        argument writes nothing).
        """
        stem = name or self.stem or self.kind
        figures = self.figures(**figure_kwargs)
        tables = self.tables()
        out = out_dir if isinstance(out_dir, OutputDir) else output_dir(out_dir, self.kind, overwrite=overwrite)
        paths = {f"{stem}.json": out.write(f"{stem}.json", self.save)}
        for table, frame in tables.items():
            file = f"{table if table != self.kind else stem}.csv"
            paths[file] = out.write(file, lambda path, frame=frame: write_csv(frame, path))
        if any(not isinstance(page, str) for page in figures.values()):
            out.write(plotlyjs_name(), lambda path: write_plotlyjs(path.parent))  # shared by the pages, ours too
        for fig, page in figures.items():
            file = f"{fig if fig != self.kind else stem}.html"
            paths[file] = out.write(file, lambda path, page=page: atomic_write_text(path, page)
                                    if isinstance(page, str) else write_html(page, path))
        return paths


def register_result(cls: type[R]) -> type[R]:
    """Class decorator: register a :class:`Result` subclass under its format tags (for :func:`load_result`).

    Raises:
        PatchlabValueError: the class declares no :attr:`~Result.schema`, or a tag is registered by another class.
    """
    if cls.schema is None:
        raise PatchlabValueError(f"result type {cls.__name__} declares no schema (the pydantic model of its file)")
    for tag in (cls.format, *cls.legacy_formats):
        if tag in _RESULT_TYPES and _RESULT_TYPES[tag] is not cls:
            raise PatchlabValueError(f"result format {tag!r} is already registered by {_RESULT_TYPES[tag].__name__}")
        _RESULT_TYPES[tag] = cls
    return cls


def result_types() -> dict[str, type[Result]]:
    """Format tag -> result class, for every registered result type."""
    return dict(_RESULT_TYPES)


def load_result(path: str | os.PathLike) -> Result:
    """Any patchlab result file, read back as its registered type (checked against its schema first).

    Raises:
        PatchlabFileError: no such file. PatchlabValueError: not JSON, of no registered result type, or not
            following its type's schema (the message names the first bad field).
    """
    data = read_json(path, what="result file")
    tag = _format_tag(data, path)
    if tag not in _RESULT_TYPES:
        for module in RESULT_MODULES:  # the built-in types register themselves when their modules load
            importlib.import_module(module)
    if tag not in _RESULT_TYPES:
        raise PatchlabValueError(f"{path} is not a patchlab result file (format {tag!r}); known: "
                                 f"{', '.join(sorted(_RESULT_TYPES))}")
    return _RESULT_TYPES[tag]._from_file(data, path)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _format_tag(data: Any, path: str | os.PathLike) -> str | None:
    """The format tag of a result file's JSON (``None`` without one).

    Raises:
        PatchlabValueError: the JSON is not an object, or its tag is not a string.
    """
    if not isinstance(data, dict):
        raise PatchlabValueError(f"{path} is not a patchlab result file: it holds a JSON {_JSON_TYPES[type(data)]}, "
                                 "not an object")
    tag = data.get("format")
    if tag is not None and not isinstance(tag, str):
        raise PatchlabValueError(f"{path} is not a patchlab result file: its format tag is a JSON "
                                 f"{_JSON_TYPES[type(tag)]}, not a string")
    return tag


def register_figure(key: type | str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the function that draws ``key``, a :class:`Result` subclass (called as
    ``fn(result, **figure_kwargs)`` by :meth:`Result.figure`, for the subclasses too) or a probe's name (called
    with the audit's ``[(pair label, ProbeResult)]``). A later registration for the same key replaces the earlier
    one (a custom style).

    Raises:
        PatchlabValueError: ``key`` is neither a class nor a non-empty string.
    """
    if not (isinstance(key, type) or (isinstance(key, str) and key)):
        raise PatchlabValueError(f"a figure is registered for a result class or a probe name, got {key!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _FIGURES[key] = fn
        return fn

    return register


def figure_function(key: type | str) -> Callable[..., Any]:
    """The figure function registered for ``key`` (a result class, looked up along its bases, or a probe's name).

    Raises:
        PatchlabValueError: none is registered.
    """
    candidates = key.__mro__ if isinstance(key, type) else (key,)
    if not any(candidate in _FIGURES for candidate in candidates):
        importlib.import_module(PRESENTATION)  # the built-in drawings register themselves when it loads
    for candidate in candidates:
        if candidate in _FIGURES:
            return _FIGURES[candidate]
    name = key.__name__ if isinstance(key, type) else repr(key)
    raise PatchlabValueError(f"no figure is registered for {name}: define its figure() or register one with "
                             "patchlab.results.register_figure")


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


def model_names(provenance: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(vanilla, unlearned)``: the short display names (:func:`patchlab.provenance.short_name`) of the checkpoints a
    result's provenance records (:func:`patchlab.provenance.pair_provenance`), ``None`` for one it lacks; for
    titles."""
    return tuple(short_name(provenance[who]["source"]) if who in provenance else None
                 for who in ("vanilla", "unlearned"))


def wide(frame: pd.DataFrame, *, index: str, columns: str, values: str) -> pd.DataFrame:
    """``frame.pivot(index=index, columns=columns, values=values)`` (rows sorted, as ``pivot`` sorts them) with the
    columns in the order they first occur in ``frame``, not sorted: layer windows labelled ``"2-6"``, ``"10-14"``
    stay in layer order."""
    return frame.pivot(index=index, columns=columns, values=values)[frame[columns].unique()]
