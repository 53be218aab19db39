"""File helpers: atomic writes (temp file + rename), output directories that never lose a file patchlab did not
write, and question/record loading (JSON, JSONL, or a ``datasets`` dataset saved with ``save_to_disk``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchlab.errors import PatchlabFileError, PatchlabValueError


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    A crash half-way never leaves a partial file at ``path``. Parent folders are created. The file gets the
    permissions of a plain ``open(path, "w")`` (``0o666`` less the umask), not the temporary file's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; raises :class:`PatchlabFileError` naming ``what`` when it is not a file."""
    if not path.is_file():
        raise PatchlabFileError(f"no such {what}: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PatchlabValueError(f"{path} is not a UTF-8 text file (byte {err.start} is not UTF-8)") from None


def _parse(path: Path, text: str, kind: str) -> Any:
    """``json.loads(text)``; raises :class:`PatchlabValueError` naming ``path`` and ``kind`` (JSON / JSONL) when the
    text is not JSON, ends before the document does (a truncated file), nests too deeply for the parser or holds an
    integer longer than Python converts (``sys.get_int_max_str_digits()``, 4300 digits by default)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        ended = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")  # strings hold no newline
        truncated = " (it ends before the JSON value does: truncated?)" if ended else ""
        raise PatchlabValueError(f"{path} is not valid {kind}{truncated}: {err}") from err
    except RecursionError:
        raise PatchlabValueError(f"{path} cannot be read as {kind}: its lists and objects nest too deeply") from None
    except ValueError as err:  # an integer beyond Python's int-string conversion limit
        raise PatchlabValueError(f"{path} cannot be read as {kind}: it holds an integer too long to convert "
                                 f"({str(err).split(';')[0]})") from None


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """The JSON value stored in ``path``.

    Args:
        what: what the file is, for the error message (``"no such task file: ..."``).

    Raises:
        PatchlabFileError: the file does not exist.
        PatchlabValueError: the file is not valid JSON.
    """
    path = Path(path)
    return _parse(path, _read_text(path, what), "JSON")


def read_dataset(path: str | os.PathLike) -> list[Any]:
    """The records (dicts) of a ``datasets`` dataset saved with ``save_to_disk`` in directory ``path``: a
    ``Dataset``, or a ``DatasetDict`` with a single split (``path/<split>`` picks one of several).

    Raises:
        PatchlabFileError: ``path`` is not a directory.
        PatchlabValueError: the directory holds no saved dataset, or a ``DatasetDict`` of several splits.
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise PatchlabFileError(f"no such dataset directory: {path}")
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise PatchlabValueError(f"{path} is a directory but not a dataset saved with save_to_disk: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise PatchlabValueError(f"{path} holds a DatasetDict with splits {', '.join(data)}: pass the directory "
                                     f"of one split, e.g. {path / next(iter(data))}")
        data = next(iter(data.values()))
    return data.to_list()


def read_records(path: str | os.PathLike) -> list[Any]:
    """Read a JSON file (a list, or a dict holding one list under any key), a JSONL file, or a ``datasets``
    directory saved with ``save_to_disk`` (:func:`read_dataset`), e.g. TOFU / open-unlearning records
    ``{"question", "answer", "paraphrased_answer", "perturbed_answer": [...]}``.

    Raises:
        PatchlabFileError: the file or directory does not exist.
        PatchlabValueError: the file is not valid JSON/JSONL or holds no list of records; the directory holds no
            saved dataset.
    """
    path = Path(path)
    if path.is_dir():
        return read_dataset(path)
    if path.suffix == ".jsonl":
        records = [_parse(path, line, "JSONL") for line in _read_text(path, "file").splitlines() if line.strip()]
    else:
        records = read_json(path)
    if isinstance(records, dict):
        lists = [v for v in records.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PatchlabValueError(f"{path}: expected a list of records or a dict holding exactly one list")
        records = lists[0]
    if not isinstance(records, list):
        raise PatchlabValueError(f"{path}: expected a list of records, got {type(records).__name__}")
    return records


def read_questions(path: str | os.PathLike) -> list[str]:
    """Questions from a JSON/JSONL file or a saved ``datasets`` directory (:func:`read_records`): strings, or
    records with a ``question`` field (TOFU's and open-unlearning's QA files among them).

    Raises:
        PatchlabValueError: a record has no question, or the file holds none.
    """
    questions = []
    for i, rec in enumerate(read_records(path)):
        q = rec.get("question") if isinstance(rec, dict) else rec
        if not isinstance(q, str) or not q.strip():
            raise PatchlabValueError(f"{path}: record {i} has no non-empty 'question' string: {rec!r}")
        questions.append(q)
    if not questions:
        raise PatchlabValueError(f"{path}: the file holds no question")
    return questions


#: How :func:`write_html` gives a page its plotly.js.
PLOTLYJS_MODES = ("shared", "inline")


def plotlyjs_name() -> str:
    """The file name of the shared plotly.js bundle, versioned (``plotly-<version>.min.js``), so pages written by
    different plotly versions in one directory never share a bundle they were not written for."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


def write_plotlyjs(directory: str | os.PathLike) -> Path:
    """Write plotly's bundled ``plotly.min.js`` (about 4.8 MB, the copy installed with plotly, no network) into
    ``directory`` as :func:`plotlyjs_name`, atomically, unless an identical copy is already there; returns its path.

    Raises:
        PatchlabFileError: a different file already has that name (patchlab never replaces a file it did not
            write).
    """
    from plotly.offline import get_plotlyjs

    path = Path(directory) / plotlyjs_name()
    bundle = get_plotlyjs().encode("utf-8")
    if path.is_file():
        if path.stat().st_size == len(bundle) and path.read_bytes() == bundle:
            return path
        raise PatchlabFileError(f"{path} exists and is not plotly's own bundle: remove or rename it, or write "
                                "self-contained pages (plotlyjs='inline')")
    return atomic_write(path, lambda tmp: tmp.write_bytes(bundle))


def write_html(figure: Any, path: str | os.PathLike, *, plotlyjs: str = "shared") -> Path:
    """Save a plotly figure as an interactive HTML page, atomically; it works offline either way:

    * ``plotlyjs="shared"`` (default, for reports of several pages): the page loads plotly.js from one bundle
      written beside it (:func:`write_plotlyjs`, once per directory, by relative path), so each page is a few
      kB to a few hundred kB instead of 4.8 MB. Keep the bundle with the pages when moving them.
    * ``plotlyjs="inline"``: a self-contained page with plotly.js embedded (about 4.8 MB).

    Raises:
        PatchlabValueError: an unknown ``plotlyjs`` mode.
        PatchlabFileError: see :func:`write_plotlyjs`.
    """
    if plotlyjs not in PLOTLYJS_MODES:
        raise PatchlabValueError(f"plotlyjs must be one of {PLOTLYJS_MODES}, got {plotlyjs!r}")
    path = Path(path)
    include: str | bool = True
    if plotlyjs == "shared":
        include = write_plotlyjs(path.parent).name
    return atomic_write(path, lambda tmp: figure.write_html(str(tmp), include_plotlyjs=include))


def write_csv(frame: Any, path: str | os.PathLike) -> Path:
    """Save a pandas DataFrame as CSV (no index), atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise unless ``path`` (a file or directory to be written, existing or not) can be created there: a probe file
    is created and removed in the nearest existing folder at or above it.

    Raises:
        PatchlabFileError: that nearest existing path is a file, or the folder is not writable (read-only, under
            ``/proc``...).
    """
    target = Path(path)
    base = target if target.is_dir() else target.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise PatchlabFileError(f"cannot create {what} {str(target)!r}: {str(base)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".patchlab-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PatchlabFileError(f"cannot write {what} {str(target)!r}: {err.strerror or err}") from err


#: The manifest patchlab writes into every output directory it owns: kind, files written, settings key.
MANIFEST = ".patchlab.json"
_MANIFEST_FORMAT = "patchlab.output/1"
_TMP_PREFIX = ".patchlab-tmp-"


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a patchlab output directory, or ``None`` when ``path`` holds none (or an unreadable one)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT else None


def _foreign_entries(path: Path) -> list[str]:
    """Names in ``path`` that are neither the manifest nor a leftover temporary directory of patchlab's."""
    return sorted(p.name for p in path.iterdir() if p.name != MANIFEST and not p.name.startswith(_TMP_PREFIX))


class OutputDir:
    """A directory a patchlab run writes its results into, claimed (checked) before any compute.

    patchlab never removes a file it did not write. The directory's manifest (``.patchlab.json``) records the run
    ``kind`` (``"checkpoint"``, ``"krs"``, ``"method_sweep"``...), the files patchlab wrote there and an optional
    ``key`` (a hash of the run's settings and inputs). Claiming ``path`` for ``kind``:

    * a new or empty directory is claimed;
    * a directory holding anything without a patchlab manifest (a thesis, a data file) is refused;
    * a directory holding another kind of patchlab output is refused;
    * a directory holding this kind of output is reused when ``resume`` and the keys match (an interrupted run
      picks up its own files), replaced only with ``overwrite=True``, and refused otherwise. Replacing removes
      only the files the old manifest lists; files a user added beside them are kept.

    The claim also proves the location writable (a probe file is created and removed in the directory or its
    nearest existing ancestor), so a read-only location, a path under ``/proc`` or a path that is a file fails
    here, before hours of compute, with a :class:`~patchlab.errors.PatchlabFileError`. The directory itself is
    created on the first write.

    Attributes:
        path: the directory (absolute). kind: the run kind. key: the settings key, if any.
        resumed: True when the directory already held this run's (possibly partial) output.
    """

    def __init__(self, path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
                 key: str | None = None):
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise PatchlabValueError(f"an output directory must be a non-empty path, got {path!r}")
        self.path = Path(path).expanduser().absolute()
        self.kind, self.key, self.overwrite = kind, key, overwrite
        self.resumed = False
        manifest = self._check_existing(resume)
        self._files: list[str] = list(manifest["files"]) if manifest and self.resumed else []
        self._old_files: list[str] = list(manifest["files"]) if manifest and not self.resumed else []
        self._ensure_writable()

    def _check_existing(self, resume: bool) -> dict[str, Any] | None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise PatchlabFileError(f"output path {str(path)!r} exists and is not a directory")
        if not path.exists() or not _foreign_entries(path):
            return read_manifest(path) if path.exists() else None
        manifest = read_manifest(path)
        if manifest is None:
            entries = _foreign_entries(path)
            raise PatchlabFileError(
                f"output directory {str(path)!r} already holds files patchlab did not write "
                f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); patchlab never removes them: "
                "choose a new or empty directory")
        if manifest.get("kind") != self.kind:
            raise PatchlabFileError(f"output directory {str(path)!r} holds a patchlab {manifest.get('kind')!r} "
                                    f"output, not a {self.kind!r} one: choose another directory")
        if resume and manifest.get("key") == self.key:
            self.resumed = True
        elif not self.overwrite:
            why = "with other settings or inputs" if resume else "from an earlier run"
            raise PatchlabFileError(
                f"output directory {str(path)!r} already holds a patchlab {self.kind} output {why}; pass "
                "overwrite=True (--overwrite on the command line) to replace it (files you added there are kept)")
        return manifest

    def _ensure_writable(self) -> None:
        """The directory, or its nearest existing ancestor, is writable (:func:`check_writable`); the directory
        itself is created on the first write, so a run that fails early leaves nothing behind."""
        check_writable(self.path, "output directory")

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PatchlabFileError(f"cannot create output directory {str(self.path)!r}: "
                                    f"{err.strerror or err}") from err

    # ---------------------------------------------------------------------------------------------- writing

    def _write_manifest(self, *, complete: bool = True) -> None:
        atomic_write_json(self.path / MANIFEST, {
            "format": _MANIFEST_FORMAT, "kind": self.kind, "key": self.key, "complete": complete,
            "files": sorted(set(self._files)), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _drop_old_files(self, keep: set[str]) -> None:
        """Remove the files of the replaced output (listed in its manifest) that this run did not rewrite."""
        for rel in self._old_files:
            if rel not in keep:
                (self.path / rel).unlink(missing_ok=True)
        self._old_files = []

    def file(self, name: str) -> Path:
        """The path of result file ``name`` inside the directory, recorded in the manifest (write it atomically,
        e.g. with :func:`atomic_write`). The first file of an overwrite removes the replaced output's files."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise PatchlabValueError(f"a result file name must be relative and inside the directory, got {name!r}")
        self._create()
        self._files.append(rel.as_posix())
        if self._old_files:
            self._drop_old_files(set(self._files))
        self._write_manifest()
        return self.path / rel

    def write_tree(self, write: Callable[[Path], None]) -> Path:
        """Call ``write(tmp)`` on an empty temporary directory, then move what it wrote into place.

        Each file is renamed into place (atomic per file) under a manifest marked incomplete until the last one is
        in, so an interrupted move leaves a directory patchlab recognises as its own; only the replaced output's
        own files are removed. If ``write`` fails, nothing in the directory changes.
        """
        self._create()
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.path))
        try:
            write(tmp)
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            self._files = files + [f for f in self._files if f not in files]
            self._write_manifest(complete=False)
            for rel in files:
                (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, self.path / rel)
            self._drop_old_files(set(files))
            self._write_manifest()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.path


def output_dir(out: str | os.PathLike | OutputDir, kind: str, *, overwrite: bool = False, resume: bool = False,
               key: str | None = None) -> OutputDir:
    """``out`` itself when it is already a claimed :class:`OutputDir` of ``kind``, else a new claim of it."""
    if isinstance(out, OutputDir):
        if out.kind != kind:
            raise PatchlabValueError(f"output directory {out.path} was claimed for {out.kind!r}, not {kind!r}")
        return out
    return OutputDir(out, kind, overwrite=overwrite, resume=resume, key=key)
