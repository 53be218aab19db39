"""The model-pair flags of patchlab's command-line scripts: ``--vanilla`` / ``--unlearned`` and their placement
flags (:func:`add_pair_args`, :func:`pair_kwargs`), the refusal of flags that do not apply to a toy-world or a
checkpoint run, and the loaders of either pair with its title (:func:`toy_pair`, :func:`checkpoint_pair`).

Like :mod:`patchlab.cli`, this module imports neither torch nor transformers at the top, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from patchlab.cli import _check_parser, model_kwargs
from patchlab.errors import PatchlabValueError

if TYPE_CHECKING:
    from patchlab.pair import ModelPair
    from patchlab.pair.sequential import SequentialPair
    from patchlab.toy import ToyPair


def add_pair_args(parser: argparse.ArgumentParser, *, placement: bool = True, several: bool = False
                  ) -> argparse.ArgumentParser:
    """Add the pair flags of :func:`patchlab.load_pair` to ``parser`` and return it: ``--vanilla``, ``--unlearned``
    (one or, with ``several``, more checkpoints), ``--tokenizer``, ``--adapter-base`` and, with ``placement``,
    ``--device-map`` (``auto`` or a JSON ``{module: device}``), ``--max-memory`` (``0=70GiB,1=70GiB,cpu=100GiB``),
    ``--offload-folder`` and ``--sequential``. No ``--vanilla`` means the toy world.

    Raises:
        PatchlabValueError: ``parser`` is not an ``argparse.ArgumentParser``.
    """
    _check_parser(parser)
    parser.add_argument("--vanilla", help="vanilla checkpoint: local directory or hub id (default: the toy world)")
    parser.add_argument("--unlearned", nargs="+" if several else None,
                        help="unlearned checkpoint" + ("s, audited side by side" if several else "")
                        + ": local directory, hub id or adapter directory")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the vanilla checkpoint's)")
    parser.add_argument("--adapter-base", help="base checkpoint of an adapter --unlearned (default: the vanilla one "
                                               "when the adapter names it)")
    if placement:
        parser.add_argument("--device-map", help="place both models over devices: 'auto' or a JSON {module: device}")
        parser.add_argument("--max-memory",
                            help="memory per device for --device-map auto, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
        parser.add_argument("--offload-folder", help="where --device-map puts modules mapped to 'disk'")
        parser.add_argument("--sequential", action="store_true",
                            help="hold one model in memory at a time (checkpoint directories or hub ids)")
    return parser


def pair_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`model_kwargs` plus the :func:`add_pair_args` flags, as :func:`patchlab.load_pair` keyword arguments.

    Raises:
        PatchlabValueError: a ``--device-map`` that is neither ``auto`` nor a JSON object, or a malformed
            ``--max-memory``.
    """
    kwargs = model_kwargs(args)
    device_map = getattr(args, "device_map", None)
    if device_map is not None and device_map != "auto":
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as err:
            raise PatchlabValueError(f"--device-map must be 'auto' or a JSON object, got {args.device_map!r}") from err
    memory = None
    if getattr(args, "max_memory", None):
        try:
            memory = {(int(k) if k.strip().isdigit() else k.strip()): v.strip()
                      for k, v in (item.split("=", 1) for item in args.max_memory.split(","))}
        except ValueError as err:
            raise PatchlabValueError(
                f"--max-memory must look like 0=70GiB,cpu=100GiB, got {args.max_memory!r}") from err
    return {**kwargs, "device_map": device_map, "max_memory": memory,
            "offload_folder": getattr(args, "offload_folder", None), "sequential": getattr(args, "sequential", False),
            "adapter_base": getattr(args, "adapter_base", None)}


#: The flags that only apply to checkpoints given with ``--vanilla`` / ``--unlearned``: :func:`add_pair_args`'s,
#: ``analyses/audit.py``'s ``--labels`` and ``--retain`` (a retain checkpoint).
CHECKPOINT_FLAGS = ("tokenizer", "adapter_base", "device_map", "max_memory", "offload_folder", "sequential", "labels",
                    "retain")
#: The flags that only apply to the toy world (a run without ``--vanilla``): which concept, unlearned how, from
#: which toy checkpoint, and the audit's ``--sanity`` case.
TOY_FLAGS = ("concept", "method", "checkpoint", "sanity")


def _refuse_flags(args: argparse.Namespace, names: Sequence[str], where: str) -> None:
    """Raise :class:`PatchlabValueError` naming those of ``names`` (flag attributes) given in ``args``: they apply
    only ``where``."""
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None)]
    if given:
        raise PatchlabValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only {where}")


def check_toy_world_flags(args: argparse.Namespace) -> None:
    """Refuse checkpoint-only flags (:data:`CHECKPOINT_FLAGS`) on a toy-world run (no ``--vanilla``), instead of
    silently ignoring them.

    Raises:
        PatchlabValueError: naming the flags that were given.
    """
    _refuse_flags(args, CHECKPOINT_FLAGS, "to checkpoints given with --vanilla/--unlearned (the toy world is built "
                                          "in memory)")


def check_checkpoint_flags(args: argparse.Namespace) -> None:
    """Refuse toy-world flags (:data:`TOY_FLAGS`: ``--concept``, ``--method``...) on a run on checkpoints, instead of
    silently ignoring them.

    Raises:
        PatchlabValueError: naming the flags that were given.
    """
    _refuse_flags(args, TOY_FLAGS, "to the toy world (a run without --vanilla)")


def toy_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`model_kwargs` with only the flags given (``{}`` by default: the toy world's float32 on the CPU)."""
    return {key: value for key, value in model_kwargs(args).items() if value is not None} \
        if hasattr(args, "dtype") else {}


def toy_pair(args: argparse.Namespace) -> tuple[ToyPair, str]:
    """The toy world's pair of a script run without checkpoints, and its title (``"toy world: CONCEPT (METHOD)"``,
    plus the dtype / device when ``--dtype`` / ``--device`` are given): ``--concept`` (default: the toy default)
    unlearned with ``--method`` (default: the toy default), in ``--dtype`` on ``--device`` when given, with progress
    bars unless ``--quiet``. Checkpoint-only flags are refused first (:func:`check_toy_world_flags`).

    Raises:
        PatchlabValueError: a checkpoint-only flag was given, or an unknown concept or method.
    """
    check_toy_world_flags(args)
    from patchlab import toy

    placement = toy_model_kwargs(args)
    world = toy.pair(**({"concept": args.concept} if args.concept else {}), **({"method": args.method}
                     if args.method else {}), progress=not args.quiet, **placement)
    where = "".join(f", {getattr(args, key)}" for key in placement)
    return world, f"toy world: {world.concept} ({world.method}{where})"


def checkpoints_title(args: argparse.Namespace) -> str:
    """The title of a run on ``--vanilla`` / ``--unlearned`` checkpoints: ``"UNLEARNED vs VANILLA"``."""
    return f"{args.unlearned} vs {args.vanilla}"


def checkpoint_pair(args: argparse.Namespace) -> tuple[ModelPair | SequentialPair, str]:
    """The pair of ``--vanilla`` / ``--unlearned`` (:func:`patchlab.load_pair` with ``--tokenizer`` and the
    :func:`pair_kwargs` flags), and its title (:func:`checkpoints_title`). Toy-world flags are refused first
    (:func:`check_checkpoint_flags`).

    Raises:
        PatchlabValueError, PatchlabFileError: see :func:`check_checkpoint_flags`, :func:`pair_kwargs` and
            :func:`patchlab.load_pair`.
    """
    check_checkpoint_flags(args)
    import patchlab

    return patchlab.load_pair(args.vanilla, args.unlearned, tokenizer=args.tokenizer, **pair_kwargs(args)), \
        checkpoints_title(args)
