"""Shared pieces of patchlab's command-line scripts (``analyses/``, ``benchmarks/``, ``python -m patchlab.toy.build``):
the help text (the whole module docstring), the exit statuses (errors, Ctrl-C), quiet mode and the ``--dtype`` /
``--device`` / ``--out`` options.

This module imports neither torch nor transformers: a script imports at the top only it and the other light
modules (``patchlab`` itself, whose names load on first use, ``patchlab.defaults``, ``patchlab.errors``,
``patchlab.io``), and the rest of patchlab inside the function that runs after parsing, so ``--help`` and argument
errors answer before the heavy libraries load.

    def parse_args(argv=None):
        p = parser(__doc__)                # --help shows the whole module docstring
        add_model_args(p); add_output_args(p, "results/x"); add_quiet_arg(p)
        return p.parse_args(argv)

    def main(argv=None) -> int:
        return run_script(parse_args, report, argv)   # run(report(args)) in quiet(args.quiet), Ctrl-C note on --out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchlab.errors import PatchlabError, PatchlabFileError, PatchlabValueError
from patchlab.io import MANIFEST, OutputDir, check_writable, read_manifest
from patchlab.progress import quiet  # re-exported: scripts use patchlab.cli.quiet

#: Names accepted by ``--dtype``, each a ``torch`` attribute.
DTYPES = ("float32", "bfloat16", "float16")

#: Exit status of a script stopped by invalid input (a :class:`~patchlab.errors.PatchlabError`).
ERROR_STATUS = 2
#: Exit status of a script stopped by Ctrl-C (SIGINT), as a shell reports it (128 + 2).
INTERRUPT_STATUS = 130
#: What :func:`run` says after Ctrl-C when the script gives no :func:`interrupt_note`.
DEFAULT_INTERRUPT_NOTE = ("stopped before the end; result files already written are whole (never half-written); "
                          "run the same command again (with --overwrite if it refuses the output directory)")

DEFAULT_DEVICE_HELP = "e.g. cuda, cpu (default: cpu)"


PLUGIN_HELP = ("import MODULE before anything else (repeatable): a dotted module name on the Python path or a .py "
               "file, whose registrations (register_metric, register_method, register_probe, register_scorer, ...) "
               "then appear in this script's choices and flags")


def parser(doc: str | None, *, plugins: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` shows ``doc`` (the script's module docstring) whole, line breaks
    and examples kept (``RawDescriptionHelpFormatter``); ``kwargs`` go to ``ArgumentParser``. With ``plugins``
    it has ``--plugin MODULE`` (repeatable), which :func:`run_script` imports before the parser is built.

    Raises:
        PatchlabValueError: ``doc`` is empty (a script without a docstring).
    """
    if not isinstance(doc, str) or not doc.strip():
        raise PatchlabValueError("a script's parser needs its module docstring (parser(__doc__))")
    p = argparse.ArgumentParser(description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                **kwargs)
    if plugins:
        p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    return p


def plugin_names(argv: Sequence[str] | None = None) -> list[str]:
    """The ``--plugin`` values of ``argv`` (default ``sys.argv[1:]``), read before the script's own parser exists
    (every other argument is left for it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    return pre.parse_known_args(argv)[0].plugin


def load_plugins(argv: Sequence[str] | None = None) -> list[Any]:
    """Import the ``--plugin`` modules of ``argv`` (:func:`patchlab.registry.import_plugins`); nothing when none
    is given, so ``--help`` stays light.

    Raises:
        PatchlabValueError: a plugin cannot be imported.
    """
    from patchlab.registry import import_plugins

    names = plugin_names(argv)
    return import_plugins(names) if names else []


def run(body: Callable[[], None], *, on_interrupt: str | Callable[[], str] | None = None) -> int:
    """Call ``body()`` and return the script's exit status:

    * 0 when it returns;
    * :data:`ERROR_STATUS` after printing ``error: <message>`` to stderr when it raises a
      :class:`~patchlab.errors.PatchlabError` (other exceptions propagate, with their traceback);
    * :data:`INTERRUPT_STATUS` after printing one line, ``interrupted: <note>``, to stderr on Ctrl-C
      (``KeyboardInterrupt``), no traceback. The note says what was saved and how to go on: ``on_interrupt``
      (a string, or a function called at that moment, e.g. :func:`interrupt_note`), else
      :data:`DEFAULT_INTERRUPT_NOTE`.

    Raises:
        PatchlabValueError: ``body`` is not callable.
    """
    if not callable(body):
        raise PatchlabValueError(f"body must be a callable taking no argument, got {type(body).__name__}")
    try:
        body()
    except PatchlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return ERROR_STATUS
    except KeyboardInterrupt:
        _close_progress_bars()
        note = on_interrupt() if callable(on_interrupt) else on_interrupt
        print(f"interrupted: {note or DEFAULT_INTERRUPT_NOTE}", file=sys.stderr)
        return INTERRUPT_STATUS
    return 0


def _close_progress_bars() -> None:
    """Close the progress bars an interrupt left open, so they end their lines now instead of redrawing
    themselves after the interrupt note when they are garbage-collected. A bar the interrupt caught half-built may
    fail to close: it is skipped (its line is cosmetic). Without tqdm loaded there is no bar."""
    tqdm_module = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a half-initialised bar; nothing to clean up
            continue


def _names(files: list[str], shown: int = 3) -> str:
    return ", ".join(files[:shown]) + (f" and {len(files) - shown} more" if len(files) > shown else "")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``, or None: every atomic rewrite of a manifest changes it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def interrupt_note(out: str | os.PathLike | OutputDir, *, resumable: bool = False,
                   extra: Callable[[], str | None] | None = None) -> Callable[[], str]:
    """A note for :func:`run`'s ``on_interrupt``, read from ``out``'s manifest when Ctrl-C comes: nothing was
    written there since this note was made (an earlier output, if any, is as it was), or which files are there
    (each whole), and how to go on: rerun to resume (``resumable``), or rerun with ``--overwrite`` to start over
    (the claim refuses an unfinished earlier output otherwise).

    ``extra``: called at that moment too; a non-empty string it returns (e.g. another file saved) is appended.
    """
    path = out.path if isinstance(out, OutputDir) else Path(out)
    before = _stamp(path / MANIFEST)

    def note() -> str:
        manifest = read_manifest(path)
        files = sorted(manifest.get("files", [])) if manifest else []
        if not files or _stamp(path / MANIFEST) == before:
            kept = " (the earlier output there is as it was)" if files else ""
            text = f"nothing was written to {path}{kept}; run the same command again" + (
                " to resume" if resumable and files else " to start over")
        elif resumable:
            text = f"{path} keeps {_names(files)} (whole files); run the same command again to resume"
        else:
            text = (f"{path} holds an unfinished output ({_names(files)}); run the same command with --overwrite to "
                    "start over")
        more = extra() if extra is not None else None
        return f"{text}; {more}" if more else text

    return note


def run_script(parse_args: Callable[[list[str] | None], argparse.Namespace],
               body: Callable[[argparse.Namespace], None], argv: list[str] | None = None, *,
               resumable: bool = False, extra: Callable[[], str | None] | None = None) -> int:
    """A script's ``main``: import the ``--plugin`` modules (:func:`load_plugins`; a failure prints ``error: ...``
    and returns :data:`ERROR_STATUS`), parse ``argv`` with ``parse_args`` (a parser that called
    :func:`add_output_args` and :func:`add_quiet_arg`), then :func:`run` ``body(args)`` inside :func:`quiet` when
    ``--quiet`` is given, saying on Ctrl-C what ``--out`` holds (:func:`interrupt_note`, with ``resumable`` and
    ``extra``). Returns the exit status."""
    status = run(lambda: load_plugins(argv))
    if status:
        return status
    args = parse_args(argv)
    with quiet(args.quiet):
        return run(lambda: body(args), on_interrupt=interrupt_note(args.out, resumable=resumable, extra=extra))


def add_quiet_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--quiet`` (no progress bars, transformers' own included: pass ``args.quiet`` to :func:`quiet` and
    ``progress=not args.quiet`` to patchlab); returns ``parser``."""
    _check_parser(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (patchlab's, transformers' and huggingface_hub's)")
    return parser


def _check_parser(parser: Any) -> None:
    if not isinstance(parser, argparse.ArgumentParser):
        raise PatchlabValueError(f"parser must be an argparse.ArgumentParser, got {type(parser).__name__}")


def add_model_args(parser: argparse.ArgumentParser, *, device_help: str = DEFAULT_DEVICE_HELP
                   ) -> argparse.ArgumentParser:
    """Add ``--dtype`` (one of :data:`DTYPES`; default: as stored) and ``--device`` to ``parser``; returns it.

    Raises:
        PatchlabValueError: ``parser`` is not an ``argparse.ArgumentParser``.
    """
    _check_parser(parser)
    parser.add_argument("--dtype", choices=DTYPES, help="model dtype (default: as stored)")
    parser.add_argument("--device", type=device_arg, help=device_help)
    return parser


def device_arg(text: str) -> str:
    """An argparse ``type`` for device flags: ``text`` unchanged when this machine has that device
    (:func:`patchlab.pair.placement.check_device`), so ``--device cuda`` on a CPU-only machine stops at parsing with
    one ``error:`` line, before anything loads.

    ``cpu``, which every machine has, passes without loading torch, so a ``default="cpu"`` (which argparse converts
    too) keeps argument errors light.

    Raises:
        argparse.ArgumentTypeError: an unknown device, or one this machine does not have.
    """
    if text == "cpu":
        return text
    from patchlab.pair.placement import check_device

    try:
        check_device(text)
    except PatchlabValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def add_output_args(parser: argparse.ArgumentParser, default: str, what: str = "output directory"
                    ) -> argparse.ArgumentParser:
    """Add ``--out`` (default ``default``) and ``--overwrite`` to ``parser``; returns it. Scripts claim ``--out``
    with :func:`patchlab.io.output_dir` before any compute.

    Raises:
        PatchlabValueError: ``parser`` is not an ``argparse.ArgumentParser``.
    """
    _check_parser(parser)
    parser.add_argument("--out", default=default, help=f"{what} (default {default}); checked before any compute")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier patchlab output in --out (files you added there are kept; a "
                             "directory holding files patchlab did not write is always refused)")
    return parser


def setting_arg(text: str) -> tuple[str, str, Any]:
    """``(section, option, value)`` of one ``SECTION.OPTION=VALUE`` argument (e.g. ``relearning.lr=1e-3``,
    ``quantization.bits=[8,4]``): the value read as JSON, else kept as the string. For ``type=`` of an option that
    sets any registered entry's setting (its name and value are checked where the settings are resolved).

    Raises:
        argparse.ArgumentTypeError: not of the form ``SECTION.OPTION=VALUE``.
    """
    key, sep, raw = text.partition("=")
    section, dot, option = key.strip().partition(".")
    if not (sep and dot and section and option):
        raise argparse.ArgumentTypeError(f"expected SECTION.OPTION=VALUE (e.g. relearning.lr=1e-3), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, option, value


def output_file(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output file") -> Path:
    """Check, before any compute, that a single result file (e.g. ``--save-mask FILE``) can be written at ``path``;
    returns it (absolute). A file already there is replaced only with ``overwrite`` (the run writes it
    atomically, so it is never half-written).

    Raises:
        PatchlabFileError: ``path`` is a directory, an existing file without ``overwrite``, under a file, or its
            folder (or the nearest existing one above it) is not writable.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise PatchlabFileError(f"{what} {str(path)!r} is a directory")
    if path.exists() and not overwrite:
        raise PatchlabFileError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
    check_writable(path, what)
    return path


def print_written(paths: Mapping[str, Any] | Sequence[Any]) -> None:
    """One ``wrote <path>`` line per file a script wrote (a report's ``{name: path}`` or a list of paths): every
    script says what it wrote in this one form, each path absolute (as :class:`patchlab.io.OutputDir` holds it)."""
    for path in (paths.values() if isinstance(paths, Mapping) else paths):
        print(f"wrote {Path(path).expanduser().absolute()}")


def comma_list(text: str | None) -> list[str] | None:
    """The items of a comma-separated flag value, stripped, empty ones dropped (``"a, b,"`` gives ``["a", "b"]``);
    ``None`` (a flag not given) stays ``None``."""
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated integers (``"0,5,10"`` gives ``[0, 5, 10]``); anything else is an
    argparse error naming the value."""
    return _number_list(text, int, "integers")


def float_list(text: str) -> list[float]:
    """An argparse ``type``: comma-separated finite numbers (``"0.5,1,2"`` gives ``[0.5, 1.0, 2.0]``); anything else
    (``nan``, ``inf`` included) is an argparse error naming the value."""
    values = _number_list(text, float, "numbers")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _number_list(text: str, kind: Callable[[str], Any], what: str) -> list:
    """``kind`` of each comma-separated item of ``text``, or an argparse error naming the value."""
    try:
        return [kind(t) for t in comma_list(text) or []]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from err


def add_template_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--template``: how questions are put to the models (:func:`patchlab.pair.generation.resolve_template`);
    read it back with :func:`prompt_template`."""
    parser.add_argument("--template", default="default",
                        help="prompt template: 'default' (Question: {question}\\n Answer:), 'chat' (the tokenizer's "
                             "chat template, one user turn, as open-unlearning prompts instruct models) or a text "
                             "holding {question}")
    return parser


def prompt_template(args: argparse.Namespace, tokenizer: Any = None) -> str:
    """The prompt template ``--template`` names (:func:`add_template_arg`); ``tokenizer``: the pair's, for
    ``chat`` (``None`` checks only a template text, before any model loads).

    Raises:
        PatchlabValueError: a text without ``{question}``; ``chat`` with a tokenizer that has no chat template.
    """
    from patchlab.pair.generation import resolve_template

    if tokenizer is None and args.template == "chat":
        return args.template
    return resolve_template(args.template, tokenizer)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``{"dtype": torch.dtype | None, "device": str | None}`` from parsed ``--dtype`` / ``--device``, the keyword
    arguments of :func:`patchlab.pair.load_model` and :func:`patchlab.pair.load_pair`.

    Raises:
        PatchlabValueError: ``args`` lacks ``dtype`` or ``device``, or ``dtype`` is not one of :data:`DTYPES`.
    """
    if not (hasattr(args, "dtype") and hasattr(args, "device")):
        raise PatchlabValueError("args must hold 'dtype' and 'device' (see add_model_args)")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise PatchlabValueError(f"dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    import torch

    return {"dtype": getattr(torch, args.dtype) if args.dtype else None, "device": args.device}
