"""File helpers: atomic writes (temp file + rename) and question/record loading (JSON or JSONL)."""

from __future__ import annotations

import json
import os
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


def read_records(path: str | os.PathLike) -> list[Any]:
    """Read a JSON file (a list, or a dict holding one list under any key) or a JSONL file.

    Raises:
        PatchlabFileError: the file does not exist.
        PatchlabValueError: the file is not valid JSON/JSONL or holds no list of records.
    """
    path = Path(path)
    if not path.is_file():
        raise PatchlabFileError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise PatchlabValueError(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {err}") from err
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
