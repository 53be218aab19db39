"""File helpers: atomic writes (temp file or directory + rename) and question/record loading (JSON or JSONL)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchlab.errors import PatchlabFileError, PatchlabValueError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    A crash half-way never leaves a partial file at ``path``. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
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
    return path.read_text(encoding="utf-8")


def _parse(path: Path, text: str, kind: str) -> Any:
    """``json.loads(text)``; raises :class:`PatchlabValueError` naming ``path`` and ``kind`` (JSON / JSONL)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PatchlabValueError(f"{path} is not valid {kind}: {err}") from err


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


def read_records(path: str | os.PathLike) -> list[Any]:
    """Read a JSON file (a list, or a dict holding one list under any key) or a JSONL file.

    Raises:
        PatchlabFileError: the file does not exist.
        PatchlabValueError: the file is not valid JSON/JSONL or holds no list of records.
    """
    path = Path(path)
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
    """Questions from a JSON/JSONL file: strings, or records with a ``question`` field.

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


def write_html(figure: Any, path: str | os.PathLike) -> Path:
    """Save a plotly figure as a standalone interactive HTML page (plotly.js embedded, works offline), atomically."""
    return atomic_write(path, lambda tmp: figure.write_html(str(tmp), include_plotlyjs=True))


def write_csv(frame: Any, path: str | os.PathLike) -> Path:
    """Save a pandas DataFrame as CSV (no index), atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh, empty directory beside ``path``, then put it in place of ``path``.

    ``path`` always holds either its previous contents or the complete new ones: an existing directory is moved
    aside to ``.{name}.old`` (a stale one left by an earlier crash is deleted first), the new one is renamed onto
    ``path``, then the old one is deleted. If ``write`` or a rename fails, the temporary directory is removed and
    the previous ``path`` is put back. The new directory gets the permissions of a plain ``mkdir`` (umask applied);
    parent folders are created.

    Raises:
        PatchlabFileError: ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PatchlabFileError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    old = path.with_name(f".{path.name}.old")
    moved_aside = False
    tmp.mkdir()
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
            moved_aside = True
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path
