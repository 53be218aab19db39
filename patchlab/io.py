"""File helpers: atomic writes (temp file + rename), output directories that never lose a file patchlab did not
write, and question/record loading (JSON, JSONL, or a ``datasets`` dataset saved with ``save_to_disk``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
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

    Raises:
        PatchlabFileError: the file could not be written (disk full, permissions), naming ``path`` and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark, as some editors write, dropped).

    Raises:
        PatchlabFileError: ``path`` is not a file (``what`` names it in the message).
        PatchlabValueError: the file is not UTF-8 text.
    """
    if not path.is_file():
        raise PatchlabFileError(f"no such {what}: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PatchlabValueError(f"{path} is not a UTF-8 text file (byte {err.start} is not UTF-8)") from None


def _parse(path: Path, text: str, kind: str, line: int | None = None) -> Any:
    """``json.loads(text)``.

    Raises:
        PatchlabValueError: ``text`` is not JSON, ends before the document does (a truncated file), nests too
            deeply for the parser or holds an integer longer than Python converts (``sys.get_int_max_str_digits()``,
            4300 digits by default); the message names ``path``, ``kind`` (JSON / JSONL) and, for JSONL, the file's
            ``line`` (1-based).
    """
    where = f"{path}, line {line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        ended = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")  # strings hold no newline
        truncated = " (it ends before the JSON value does: truncated?)" if ended else ""
        at = f"column {err.colno}" if line is not None else f"line {err.lineno} column {err.colno}"
        raise PatchlabValueError(f"{where} is not valid {kind}{truncated}: {err.msg} ({at})") from err
    except RecursionError:
        raise PatchlabValueError(f"{where} cannot be read as {kind}: its lists and objects nest too deeply") from None
    except ValueError as err:  # an integer beyond Python's int-string conversion limit
        raise PatchlabValueError(f"{where} cannot be read as {kind}: it holds an integer too long to convert "
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
        lines = enumerate(_read_text(path, "file").splitlines(), start=1)
        records = [_parse(path, line, "JSONL", number) for number, line in lines if line.strip()]
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
#: The lock file a run holds inside the output directory it writes (its pid inside), released when it ends.
LOCK = ".patchlab.lock"
_MANIFEST_FORMAT = "patchlab.output/1"
_TMP_PREFIX = ".patchlab-tmp-"


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a patchlab output directory, or ``None`` when ``path`` holds none (or an unreadable one).

    The manifest is read as it is written; its file entries are *not* checked here: only
    :func:`trusted_entries` says which of them patchlab may touch.
    """
    try:
        data = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT else None


def _entry_problem(root: Path, rel: Any) -> str | None:
    """Why manifest entry ``rel`` of directory ``root`` (already resolved, symlinks included) may not be touched,
    or ``None`` when it names a regular file strictly inside ``root`` (after resolving every symlink on the way)
    or nothing at all (a file listed but since removed)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return f"{rel!r} is not a file name"
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or rel != Path(rel).as_posix() or parts[0] in (MANIFEST, LOCK):
        return f"{rel!r} is not a plain relative path inside the directory"
    target = Path(os.path.realpath(root / rel))
    if target == root or root not in target.parents:
        return f"{rel!r} resolves to {str(target)!r}, outside the directory"
    if os.path.lexists(target) and not target.is_file():
        return f"{rel!r} is not a regular file"
    return None


def trusted_entries(path: str | os.PathLike, manifest: Mapping[str, Any]) -> list[str]:
    """The file entries of ``manifest`` (its ``files`` and ``pending`` lists) that name files still present in
    output directory ``path``, in order, each checked to resolve (symlinks included) to a regular file strictly
    inside it; entries naming files no longer there are dropped.

    Raises:
        PatchlabFileError: an entry escapes the directory (``../x``, an absolute path, a symlink leading out), names
            a directory or anything but a regular file, or the lists are malformed. The manifest is then untrusted
            as a whole and nothing in the directory may be removed on its word.
    """
    root = Path(os.path.realpath(path))
    entries: list[Any] = []
    for field in ("files", "pending"):
        value = manifest.get(field, [])
        if not isinstance(value, list):
            raise PatchlabFileError(f"the manifest {str(Path(path) / MANIFEST)!r} is not patchlab's: its {field!r} "
                                    "is not a list; patchlab removes nothing on its word: move the directory's "
                                    "contents elsewhere or choose another directory")
        entries += value
    for rel in entries:
        problem = _entry_problem(root, rel)
        if problem:
            raise PatchlabFileError(
                f"the manifest {str(Path(path) / MANIFEST)!r} cannot be trusted: entry {problem}; patchlab removes "
                "nothing on its word: inspect the directory, or choose another one")
    return list(dict.fromkeys(rel for rel in entries if (root / rel).is_file()))


def _foreign_entries(path: Path) -> list[str]:
    """Names in ``path`` that are neither the manifest, the lock nor a leftover temporary directory of patchlab's."""
    return sorted(p.name for p in path.iterdir()
                  if p.name not in (MANIFEST, LOCK) and not p.name.startswith(_TMP_PREFIX))


class _Lock:
    """An exclusive ``flock`` on :data:`LOCK` inside an output directory, with the holder's pid in the file.

    Taken through :func:`_hold`: the claims of one process on one directory share one lock, released when the last
    :class:`OutputDir` holding it is closed or collected, and at the latest when the process exits (the kernel drops
    a ``flock`` even on ``kill -9``, so a stale lock file never blocks a later run).
    """

    def __init__(self, directory: Path, created: list[Path]):
        self.path, self.fd = directory / LOCK, None
        holder = self.holder(directory)
        if holder is not None:
            raise _busy(directory, holder)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise _busy(directory, self.holder(directory) or 0) from None
            if os.fstat(fd).st_ino == _inode(self.path):
                self.fd = fd
            else:  # the holder released and removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        weakref.finalize(self, _Lock._free, self.fd, self.path, created)

    @staticmethod
    def holder(directory: Path) -> int | None:
        """The pid of the process holding ``directory``'s lock, or ``None`` when nobody holds it."""
        try:
            fd = os.open(directory / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        finally:
            os.close(fd)
        return None

    @staticmethod
    def _free(fd: int, path: Path, created: list[Path]) -> None:
        """Remove the lock file (and the folders the claim created, when nothing else was written into them)."""
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == _inode(path):
                path.unlink()
        os.close(fd)
        _remove_empty(created)


_HELD: weakref.WeakValueDictionary[str, _Lock] = weakref.WeakValueDictionary()


def _hold(directory: Path, created: list[Path]) -> _Lock:
    """This process's lock on ``directory``: the one an earlier claim holds, else a new one (:class:`_Lock`)."""
    key = os.path.realpath(directory)
    lock = _HELD.get(key)
    if lock is None:
        lock = _HELD[key] = _Lock(directory, created)
    return lock


def _secondary_rank() -> bool:
    """True in a process of a distributed launch (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) other
    than rank 0: the job's rank 0 holds the output directory's lock for the whole job, and only it writes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _busy(directory: Path, pid: int) -> PatchlabFileError:
    who = f"process {pid}" if pid else "pid unknown"
    return PatchlabFileError(f"output directory {str(directory)!r} is in use by another patchlab run ({who}); wait "
                             "for it to end or choose another directory")


class OutputDir:
    """A directory a patchlab run writes its results into, claimed (checked and locked) before any compute.

    patchlab never touches a file outside the directory, nor one inside it that it did not write. The directory's
    manifest (``.patchlab.json``) records the run ``kind`` (``"checkpoint"``, ``"krs"``, ``"method_sweep"``...),
    exactly the files patchlab wrote there (``files``; ``pending``: those being written at that moment) and an
    optional ``key`` (a hash of the run's settings and inputs). Claiming ``path`` for ``kind``:

    * a new or empty directory is claimed;
    * a directory holding anything without a patchlab manifest (a thesis, a data file) is refused;
    * a directory holding another kind of patchlab output is refused;
    * a manifest with any entry that does not resolve (symlinks included) to a regular file strictly inside the
      directory (``../thesis.tex``, ``/home/me/notes.txt``, a symlink leading out, a directory) is untrusted: the
      claim is refused and nothing is removed (:func:`trusted_entries`);
    * a directory holding this kind of output is reused when ``resume`` and the keys match (an interrupted run
      picks up its own files), replaced only with ``overwrite=True``, and refused otherwise. Replacing removes
      only the files the old manifest lists; files a user added beside them are kept;
    * a directory another run is writing (its lock, :data:`LOCK`, is held) is refused, naming that run's pid.

    The claim proves the location writable, so a read-only location, a path under ``/proc``, a path that is a file
    or a dangling symlink fails here, before hours of compute, with a :class:`~patchlab.errors.PatchlabFileError`.
    It creates the directory to hold the lock; :meth:`close` (or the end of the process) releases the lock and
    removes the directory again when nothing was written into it.

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
        self._check_path()
        secondary = _secondary_rank()
        holder = _Lock.holder(self.path) if self.path.is_dir() and not secondary else None
        if holder is not None and os.path.realpath(self.path) not in _HELD:
            raise _busy(self.path, holder)
        entries = self._check_existing(resume)
        self._files: list[str] = entries if self.resumed else []
        self._old_files: list[str] = [] if self.resumed else entries
        self._pending: list[str] = []
        check_writable(self.path, "output directory")
        self._lock: _Lock | None = None if secondary else self._take_lock()
        self._closed = False

    def _check_path(self) -> None:
        path = self.path
        if path.is_symlink() and not path.exists():
            raise PatchlabFileError(f"output path {str(path)!r} is a dangling symlink (to {os.readlink(path)!r}): "
                                    "remove it or create its target")
        if path.exists() and not path.is_dir():
            raise PatchlabFileError(f"output path {str(path)!r} exists and is not a directory")

    def _check_existing(self, resume: bool) -> list[str]:
        """The trusted file entries (:func:`trusted_entries`) of the output already in the directory, after checking
        that this claim may resume or replace it."""
        path = self.path
        manifest = read_manifest(path) if path.is_dir() else None
        if not path.exists() or not _foreign_entries(path):
            return trusted_entries(path, manifest) if manifest else []
        if manifest is None:
            entries = _foreign_entries(path)
            raise PatchlabFileError(
                f"output directory {str(path)!r} already holds files patchlab did not write "
                f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); patchlab never removes them: "
                "choose a new or empty directory")
        if manifest.get("kind") != self.kind:
            raise PatchlabFileError(f"output directory {str(path)!r} holds a patchlab {manifest.get('kind')!r} "
                                    f"output, not a {self.kind!r} one: choose another directory")
        entries = trusted_entries(path, manifest)
        if resume and manifest.get("key") == self.key:
            self.resumed = True
        elif not self.overwrite:
            why = "with other settings or inputs" if resume else "from an earlier run"
            raise PatchlabFileError(
                f"output directory {str(path)!r} already holds a patchlab {self.kind} output {why}; pass "
                "overwrite=True (--overwrite on the command line) to replace it (files you added there are kept)")
        return entries

    def _take_lock(self) -> _Lock:
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._create()
        try:
            return _hold(self.path, created)
        except BaseException:
            _remove_empty(created)
            raise

    def close(self) -> None:
        """Release the directory's lock (also done when the process ends); the directory is removed again when the
        claim created it and nothing was written. Writing after :meth:`close` is an error."""
        self._lock, self._closed = None, True

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PatchlabFileError(f"cannot create output directory {str(self.path)!r}: "
                                    f"{err.strerror or err}") from err

    # ---------------------------------------------------------------------------------------------- writing

    def _write_manifest(self) -> None:
        """Record exactly the files present (``files``) and those being written now (``pending``)."""
        self._files = [f for f in dict.fromkeys(self._files) if (self.path / f).is_file()]
        atomic_write_json(self.path / MANIFEST, {
            "format": _MANIFEST_FORMAT, "kind": self.kind, "key": self.key, "complete": not self._pending,
            "files": sorted(self._files), "pending": sorted(self._pending),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _drop_old_files(self, keep: set[str]) -> None:
        """Remove the files of the replaced output (listed in its manifest, each checked again just before, as in
        :func:`trusted_entries`) that this run did not rewrite."""
        root = Path(os.path.realpath(self.path))
        for rel in self._old_files:
            if rel not in keep and _entry_problem(root, rel) is None:
                (self.path / rel).unlink(missing_ok=True)
        self._old_files = []

    def _check_open(self) -> None:
        if self._closed:
            raise PatchlabValueError(f"output directory {self.path} was closed; claim it again to write")
        self._create()

    def _relative(self, name: str) -> str:
        """``name`` as the manifest records it, checked to name a file strictly inside the directory."""
        problem = _entry_problem(Path(os.path.realpath(self.path)), name)
        if problem:
            raise PatchlabValueError(f"a result file name must be relative and inside the directory: {problem}")
        return name

    def write(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Write result file ``name`` inside the directory: ``write(path)`` writes ``path`` (atomically, e.g.
        ``lambda p: atomic_write_json(p, obj)``). The manifest lists ``name`` as pending while it is written and as
        written once it is there, so it always says exactly what the directory holds. The first file of an
        overwrite removes the replaced output's files. Returns the path.

        Raises:
            PatchlabValueError: ``name`` is absolute or leads outside the directory.
            PatchlabFileError: the file could not be written (disk full, permissions); the manifest then lists
                only the files that are there.
        """
        self._check_open()
        rel = self._relative(name)
        if self._old_files:
            self._drop_old_files({rel})
        self._pending.append(rel)
        try:
            self._write_manifest()
            write(self.path / rel)
        except OSError as err:
            raise _write_error(self.path / rel, err) from err
        finally:
            self._pending.remove(rel)
            self._files.append(rel)  # kept only if the file is there
            with contextlib.suppress(OSError, PatchlabFileError):
                self._write_manifest()
        return self.path / rel

    def write_tree(self, write: Callable[[Path], None]) -> Path:
        """Call ``write(tmp)`` on an empty temporary directory, then move what it wrote into place.

        Each file is renamed into place (atomic per file) under a manifest listing those not yet moved as pending,
        so an interrupted move leaves a directory patchlab recognises as its own; only the replaced output's own
        files are removed. If ``write`` fails, nothing in the directory changes. Every file gets the permissions of a
        plain ``open(path, "w")`` (``0o666`` less the umask), whatever mode ``write`` created it with (safetensors
        writes weights ``0o600``).

        Raises:
            PatchlabFileError: the files could not be written (disk full, permissions).
        """
        self._check_open()
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.path))
        try:
            try:
                write(tmp)
            except OSError as err:
                raise _write_error(self.path, err) from err
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            self._pending = list(files)
            self._write_manifest()
            mode = 0o666 & ~_umask()
            for rel in files:
                (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp / rel, mode)
                os.replace(tmp / rel, self.path / rel)
                self._pending.remove(rel)
                self._files.append(rel)
            self._drop_old_files(set(files))
            self._write_manifest()
        finally:
            self._pending = []
            shutil.rmtree(tmp, ignore_errors=True)
        return self.path


def _write_error(path: Path, err: OSError) -> PatchlabFileError:
    """A :class:`PatchlabFileError` for a failed write of ``path`` (disk full, permissions...)."""
    if isinstance(err, PatchlabFileError):
        return err
    full = err.errno == errno.ENOSPC
    why = "the disk is full" if full else (err.strerror or str(err))
    todo = "free space, then run the same command again" if full else "fix that, then run the same command again"
    return PatchlabFileError(f"cannot write {str(path)!r}: {why}; the files already written are whole and listed in "
                             f"the directory's {MANIFEST}; {todo}")


def output_dir(out: str | os.PathLike | OutputDir, kind: str, *, overwrite: bool = False, resume: bool = False,
               key: str | None = None) -> OutputDir:
    """``out`` itself when it is already a claimed :class:`OutputDir` of ``kind``, else a new claim of it."""
    if isinstance(out, OutputDir):
        if out.kind != kind:
            raise PatchlabValueError(f"output directory {out.path} was claimed for {out.kind!r}, not {kind!r}")
        return out
    return OutputDir(out, kind, overwrite=overwrite, resume=resume, key=key)
