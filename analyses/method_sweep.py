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

import patchlab
from patchlab.behavior import ALL_METHODS, SweepTask, method_sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vanilla", help="vanilla checkpoint: local directory or hub id (default: the toy world)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the vanilla checkpoint's)")
    p.add_argument("--task", help="JSON task file (required with --vanilla)")
    p.add_argument("--checkpoint", help="toy-world checkpoint directory (default: the shipped one)")
    p.add_argument("--concept", help="toy-world concept (default: the toy default)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset of the methods")
    p.add_argument("--max-new-tokens", type=int, default=30, help="greedy answer length limit (default 30)")
    p.add_argument("--out", default="results/method_sweep", help="output directory (runs/, sweep.json/.csv/.html)")
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[object, object, SweepTask]:
    """The vanilla model (or its path), its tokenizer and the task, from a checkpoint + task file or the toy world."""
    if args.vanilla is None:
        if args.task:
            raise patchlab.PatchlabValueError("--task needs --vanilla (the toy world brings its own task)")
        from patchlab import toy

        model, tok = toy.vanilla(args.checkpoint) if args.checkpoint else toy.vanilla()
        return model, tok, SweepTask.toy(args.concept, args.checkpoint)
    if not args.task:
        raise patchlab.PatchlabValueError("--vanilla needs --task (a JSON task file)")
    from patchlab.pair import load_tokenizer

    task = SweepTask.from_json(args.task)
    return args.vanilla, load_tokenizer(args.tokenizer or args.vanilla), task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        vanilla, tok, task = load_inputs(args)
        result = method_sweep(vanilla, tok, task, args.out,
                              methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                              max_new_tokens=args.max_new_tokens)
    except patchlab.PatchlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    columns = ["method", "strength", "target_bleu", "unrelated_bleu", "target_rouge_l", "unrelated_rouge_l", "seconds"]
    print(f"method sweep on {task.name}")
    print(result.to_frame()[columns].round(2).to_string(index=False))
    print(f"wrote {args.out}/sweep.json, sweep.csv, sweep.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
