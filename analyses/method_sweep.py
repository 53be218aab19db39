"""Method sweep from the shell: unlearn with every method at three strengths, evaluate, plot (Hong et al., Fig. 2).

With no arguments it runs on the embedded toy world (default concept), offline, resumably:

    python analyses/method_sweep.py
    python analyses/method_sweep.py --methods ga,npo,memit_empty --out results/sweep-small
    python analyses/method_sweep.py --vanilla path/or/hub-id --task task.json --out results/my-sweep

A task file is a JSON object with ``forget``, ``retain``, ``target_questions``, ``unrelated_questions`` (lists of
strings), ``subject`` and optionally ``name`` and ``cov_texts``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import patchlab
from patchlab.cli import (add_model_args, add_output_args, add_quiet_arg, comma_list, model_kwargs, parser,
                          print_written, run_script)
from patchlab.io import output_dir
from patchlab.cli_pairs import check_checkpoint_flags, check_toy_world_flags

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from patchlab.analysis.method_sweep import SweepTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    p.add_argument("--vanilla", help="vanilla checkpoint: local directory or hub id (default: the toy world)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the vanilla checkpoint's)")
    p.add_argument("--task", help="JSON task file (required with --vanilla)")
    p.add_argument("--checkpoint", help="toy-world checkpoint directory (default: the shipped one)")
    p.add_argument("--concept", help="toy-world concept (default: the toy default)")
    p.add_argument("--methods", help="comma-separated subset of the registered methods (default: all of "
                                      "patchlab.unlearning.methods.method_names())")
    p.add_argument("--max-new-tokens", type=int, default=30, help="greedy answer length limit (default 30)")
    add_model_args(p)
    add_output_args(p, "results/method_sweep", "output directory (runs/, sweep.json/.csv/.html); an earlier sweep "
                    "there is resumed")
    add_quiet_arg(p)
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SweepTask]:
    """The vanilla model (in --dtype, on --device), its tokenizer and the task, from a checkpoint + task file or
    the toy world."""
    from patchlab.analysis.method_sweep import SweepTask
    from patchlab.pair import load_model, load_tokenizer

    if args.vanilla is None:
        if args.task:
            raise patchlab.PatchlabValueError("--task needs --vanilla (the toy world brings its own task)")
        check_toy_world_flags(args)
        from patchlab import toy

        task = toy.sweep_task(args.concept, args.checkpoint)  # an unknown concept fails before the model loads
        model, tok = toy.vanilla(args.checkpoint) if args.checkpoint else toy.vanilla()
        return load_model(model, **model_kwargs(args)), tok, task
    if not args.task:
        raise patchlab.PatchlabValueError("--vanilla needs --task (a JSON task file)")
    check_checkpoint_flags(args)
    task = SweepTask.from_json(args.task)
    model = load_model(args.vanilla, **model_kwargs(args))
    return model, load_tokenizer(args.tokenizer or args.vanilla), task


def sweep_and_report(args: argparse.Namespace) -> None:
    """Run (or resume) the sweep into --out and print its summary table."""
    from patchlab.analysis.method_sweep import method_sweep

    out = output_dir(args.out, "method_sweep", overwrite=args.overwrite, resume=not args.overwrite)
    vanilla, tok, task = load_inputs(args)
    result = method_sweep(vanilla, tok, task, out,
                          methods=comma_list(args.methods),
                          max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    columns = ["method", "strength", "target_bleu", "unrelated_bleu", "target_rouge_l", "unrelated_rouge_l", "seconds"]
    print(f"method sweep on {task.name}")
    print(result.to_frame()[columns].round(2).to_string(index=False))
    print_written([Path(args.out) / name for name in ("sweep.json", "sweep.csv", "sweep.html")])


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, sweep_and_report, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
