"""KRS sweep from the shell: restore components of the vanilla model inside the unlearned one.

With no arguments it runs on the embedded toy world (default concept, graddiff-unlearned), offline:

    python analyses/krs_sweep.py
    python analyses/krs_sweep.py --vanilla path/or/hub-id --unlearned path --questions qs.jsonl --out results/hp
"""

from __future__ import annotations

import argparse
import sys

import patchlab
from patchlab.cli import add_model_args, add_output_args, model_kwargs, parser, run
from patchlab.io import output_dir, read_questions
from patchlab.patching.sweep import DEFAULT_COMPONENTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--vanilla", help="vanilla checkpoint: local directory or hub id (default: the toy world)")
    p.add_argument("--unlearned", help="unlearned checkpoint: local directory or hub id")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the vanilla checkpoint's)")
    p.add_argument("--questions", help="JSON/JSONL file of questions (strings or records with 'question')")
    p.add_argument("--concept", help="toy-world concept (toy world only)")
    p.add_argument("--method", default="graddiff", help="toy-world unlearning method (toy world only)")
    p.add_argument("--components", default=",".join(DEFAULT_COMPONENTS),
                   help="comma-separated components, e.g. coef,value,attn,coef+attn")
    p.add_argument("--window", type=int, default=5, help="layers per window (default 5)")
    p.add_argument("--window-mode", default="centered", choices=["centered", "fixed"])
    p.add_argument("--n-tokens", type=int, default=30, help="answer tokens N (default 30)")
    p.add_argument("--positions", default="all", choices=["all", "answer", "last_prompt"])
    p.add_argument("--engine", default="batched", choices=["batched", "loop"])
    p.add_argument("--batch-size", type=int, default=64, help="restorations per forward pass")
    add_model_args(p)
    p.add_argument("--aggregate", default="mean", choices=["mean", "pooled"],
                   help="over questions: mean of per-question KRS, or the paper's pooled losses (table and heatmap)")
    add_output_args(p, "results/krs", "output directory for krs.json/.csv/.html")
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[patchlab.ModelPair, list[str], str]:
    """The pair, the questions and a title, from explicit checkpoints or the toy world."""
    if args.vanilla is None and args.unlearned is None:
        from patchlab import toy

        world = toy.pair(**({"concept": args.concept} if args.concept else {}), method=args.method)
        questions = read_questions(args.questions) if args.questions else list(world.questions)
        return world.pair, questions, f"toy world: {world.concept} ({world.method})"
    if not (args.vanilla and args.unlearned and args.questions):
        raise patchlab.PatchlabValueError("--vanilla, --unlearned and --questions go together (or give none of them)")
    pair = patchlab.load_pair(args.vanilla, args.unlearned, tokenizer=args.tokenizer, **model_kwargs(args))
    return pair, read_questions(args.questions), f"{args.unlearned} vs {args.vanilla}"


def report(args: argparse.Namespace) -> None:
    """Run the sweep, write krs.json/.csv/.html and print the component x window table."""
    out = output_dir(args.out, "krs", overwrite=args.overwrite)
    pair, questions, title = load_inputs(args)
    result = patchlab.krs_sweep(
        pair, questions, components=[c.strip() for c in args.components.split(",") if c.strip()],
        window=args.window, window_mode=args.window_mode, n_tokens=args.n_tokens, positions=args.positions,
        engine=args.engine, batch_size=args.batch_size)
    paths = result.write_report(out, aggregate=args.aggregate)
    print(f"KRS sweep on {title}: {len(questions)} questions, {pair.n_layers} layers, window {args.window}")
    column = "krs" if args.aggregate == "mean" else "krs_pooled"
    print(result.to_frame().pivot(index="component", columns="window", values=column).round(3).to_string())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
