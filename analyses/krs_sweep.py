"""KRS sweep from the shell: restore components of the vanilla model inside the unlearned one.

With no arguments it runs on the embedded toy world (default concept, graddiff-unlearned), offline:

    python analyses/krs_sweep.py
    python analyses/krs_sweep.py --vanilla path/or/hub-id --unlearned path --questions qs.jsonl --out results/hp
    python analyses/krs_sweep.py --method npo --out results/krs-npo --compare results/krs/krs.json

It writes krs.json (every number and its provenance), krs.csv (component x window), krs_per_question.csv (one row
per question) and krs.html / krs_per_question.html (heatmaps) into --out. Each question's scores are saved as soon
as they are computed, so an interrupted sweep resumes where it stopped when rerun with the same arguments.
--compare OTHER.json also writes the two sweeps side by side and their difference (krs_comparison.*).
"""

from __future__ import annotations

import argparse
import sys

import patchlab
from patchlab.cli import (add_model_args, add_output_args, add_quiet_arg, add_template_arg, comma_list, parser,
                          print_written, prompt_template, run_script)
from patchlab.cli_pairs import add_pair_args, checkpoint_pair, toy_pair
from patchlab.defaults import DEFAULT_COMPONENTS
from patchlab.io import output_dir, read_questions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    add_pair_args(p)
    p.add_argument("--questions", help="JSON/JSONL file of questions (strings or records with 'question')")
    p.add_argument("--concept", help="toy-world concept (toy world only)")
    p.add_argument("--method", help="toy-world unlearning method (toy world only; default graddiff)")
    p.add_argument("--components", default=",".join(DEFAULT_COMPONENTS),
                   help="comma-separated components, e.g. coef,value,attn,coef+attn")
    p.add_argument("--window", type=int, default=5, help="layers per window (default 5)")
    p.add_argument("--window-mode", default="centered", choices=["centered", "fixed"])
    p.add_argument("--n-tokens", type=int, default=30, help="answer tokens N (default 30)")
    add_template_arg(p)
    p.add_argument("--positions", default="all", choices=["all", "answer", "last_prompt", "scored"])
    p.add_argument("--metric", default="krs",
                   help="recovery metric, one of patchlab.metrics() (default krs; see patchlab.patching.metrics)")
    p.add_argument("--heads", action="store_true", help="one row per attention head for components with 'heads'")
    p.add_argument("--engine", default="batched", choices=["batched", "loop"])
    p.add_argument("--batch-size", type=int, default=64, help="restorations per forward pass")
    add_model_args(p)
    p.add_argument("--aggregate", default="mean", choices=["mean", "pooled"],
                   help="over questions: mean of per-question KRS, or the paper's pooled losses (table and heatmap)")
    p.add_argument("--compare", metavar="OTHER_JSON", help="a krs.json of another sweep with the same settings: "
                   "also write both side by side and their difference")
    add_output_args(p, "results/krs", "output directory for krs.json/.csv/.html")
    add_quiet_arg(p)
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[patchlab.ModelPair, list[str], str]:
    """The pair, the questions and a title, from explicit checkpoints or the toy world. --questions is read and
    checked first, before any model loads."""
    toy = args.vanilla is None and args.unlearned is None
    if not toy and not (args.vanilla and args.unlearned and args.questions):
        raise patchlab.PatchlabValueError("--vanilla, --unlearned and --questions go together (or give none of them)")
    questions = read_questions(args.questions) if args.questions else None
    if toy:
        world, title = toy_pair(args)
        return world.pair, questions if questions is not None else list(world.questions), title
    pair, title = checkpoint_pair(args)
    return pair, questions, title


def report(args: argparse.Namespace) -> None:
    """Run (or resume) the sweep, write the report and print the component x window table."""
    from patchlab.patching.metrics import get_metric
    from patchlab.results import wide

    get_metric(args.metric)  # an unknown metric fails before any output or model
    out = output_dir(args.out, "krs", overwrite=args.overwrite, resume=True)
    other = patchlab.PatchResult.load(args.compare) if args.compare else None
    prompt_template(args)  # a template text without {question} fails before any model loads
    pair, questions, title = load_inputs(args)
    result = patchlab.patch_sweep(
        pair, questions, components=comma_list(args.components), prompt_template=prompt_template(args, pair.tokenizer),
        window=args.window, window_mode=args.window_mode, n_tokens=args.n_tokens, positions=args.positions,
        metric=args.metric, heads="each" if args.heads else None, engine=args.engine, batch_size=args.batch_size,
        resume=out, progress=not args.quiet)
    comparison = patchlab.compare(other, result) if other is not None else None  # refuses other settings
    paths = result.write_report(out, aggregate=args.aggregate)
    if comparison is not None:
        paths.update(comparison.write_report(out))  # krs_comparison.* beside krs.*, one plotly.js bundle
    print(f"{result.value_name} sweep on {title}: {len(questions)} questions, {pair.n_layers} layers, "
          f"window {args.window}")
    column = args.metric if args.aggregate == "mean" else f"{args.metric}_pooled"
    print(wide(result.to_frame(), index="component", columns="layers", values=column).round(3).to_string())
    if comparison is not None:
        print(f"difference ({comparison.labels[1]} - {comparison.labels[0]}):")
        print(wide(comparison.to_frame(), index="component", columns="layers", values="difference")
              .round(3).to_string())
    print_written(paths)


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
