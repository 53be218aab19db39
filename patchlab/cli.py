"""Shared pieces of patchlab's command-line scripts (``analyses/``, ``benchmarks/``, ``python -m patchlab.toy.build``):
the error-to-exit-status convention and the ``--dtype`` / ``--device`` model options.

    def main(argv=None) -> int:
        args = parse_args(argv)            # a parser that called add_model_args
        return run(lambda: report(args))   # report() loads with load_model(path, **model_kwargs(args))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from patchlab.errors import PatchlabError, PatchlabValueError

#: Names accepted by ``--dtype``, each a ``torch`` attribute.
DTYPES = ("float32", "bfloat16", "float16")

#: Exit status of a script stopped by invalid input (a :class:`~patchlab.errors.PatchlabError`).
ERROR_STATUS = 2

DEFAULT_DEVICE_HELP = "e.g. cuda, cpu (default: cpu)"


def run(body: Callable[[], None]) -> int:
    """Call ``body()`` and return the script's exit status: 0, or :data:`ERROR_STATUS` after printing
    ``error: <message>`` to stderr when it raises a :class:`~patchlab.errors.PatchlabError` (other exceptions
    propagate, with their traceback).

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
    return 0


def add_model_args(parser: argparse.ArgumentParser, *, device_help: str = DEFAULT_DEVICE_HELP
                   ) -> argparse.ArgumentParser:
    """Add ``--dtype`` (one of :data:`DTYPES`; default: as stored) and ``--device`` to ``parser``; returns it.

    Raises:
        PatchlabValueError: ``parser`` is not an ``argparse.ArgumentParser``.
    """
    if not isinstance(parser, argparse.ArgumentParser):
        raise PatchlabValueError(f"parser must be an argparse.ArgumentParser, got {type(parser).__name__}")
    parser.add_argument("--dtype", choices=DTYPES, help="model dtype (default: as stored)")
    parser.add_argument("--device", help=device_help)
    return parser


def add_output_args(parser: argparse.ArgumentParser, default: str, what: str = "output directory"
                    ) -> argparse.ArgumentParser:
    """Add ``--out`` (default ``default``) and ``--overwrite`` to ``parser``; returns it. Scripts claim ``--out``
    with :func:`patchlab.io.output_dir` before any compute.

    Raises:
        PatchlabValueError: ``parser`` is not an ``argparse.ArgumentParser``.
    """
    if not isinstance(parser, argparse.ArgumentParser):
        raise PatchlabValueError(f"parser must be an argparse.ArgumentParser, got {type(parser).__name__}")
    parser.add_argument("--out", default=default, help=f"{what} (default {default}); checked before any compute")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier patchlab output in --out (files you added there are kept; a "
                             "directory holding files patchlab did not write is always refused)")
    return parser


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
    return {"dtype": getattr(torch, args.dtype) if args.dtype else None, "device": args.device}
