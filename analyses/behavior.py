"""Behavioural tests of an existing vanilla / unlearned pair from the shell: did the answers change?

With no arguments it runs on the embedded toy world (default concept, graddiff-unlearned; target: the concept's
10 questions, unrelated: its 50 unrelated questions), offline:

    python analyses/behavior.py
    python analyses/behavior.py --vanilla path/or/hub-id --unlearned runs/graddiff \\
        --target target.jsonl --unrelated unrelated.jsonl --out results/behavior

Both models answer every question greedily (token ids kept, at most --max-new-tokens); each after-answer is scored
against the before-answer of the same question with sacrebleu's sentence BLEU (0-100, on the decoded text) and
ROUGE-L F1 (0-1, on the token ids): 100 / 1 means the answer did not change. Unlearning should lower the target
scores and keep the unrelated ones. Nothing is trained (the method sweep, ``analyses/method_sweep.py``, retrains).
When the records carry TOFU's fields, both models also get TOFU's answer probability (every record has an
``answer``) and truth ratio (every record has a ``paraphrased_answer`` and a ``perturbed_answer`` list), as
open-unlearning computes them: ``--target tofu/forget10_perturbed --unrelated tofu/retain_perturbed``.

Question files are JSON/JSONL or saved ``datasets`` directories: strings or records with a ``question`` field.
Writes ``behavior.csv`` (one row per question: set, question, before, after, bleu, rouge_l, same, and
prob_before/after, truth_ratio_before/after when scored), ``behavior.json`` (the averages per set, the
settings, the provenance: both checkpoints with a hash of their weights and the question files; the rows,
``"partial": false``; ``patchlab.load_result`` reads it back) and ``behavior.html`` (the per-question scores; it
loads plotly.js from a file written beside it) into --out.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import patchlab
from patchlab.cli import (add_model_args, add_output_args, add_quiet_arg, add_template_arg, parser, print_written,
                          prompt_template, run_script)
from patchlab.cli_pairs import add_pair_args, checkpoint_pair, toy_pair
from patchlab.io import output_dir, read_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    add_pair_args(p)
    p.add_argument("--target", help="JSON/JSONL file of target questions (what was unlearned)")
    p.add_argument("--unrelated", help="JSON/JSONL file of unrelated questions (what must be kept)")
    p.add_argument("--concept", help="toy-world concept (toy world only)")
    p.add_argument("--method", help="toy-world unlearning method (toy world only; default graddiff)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="greedy answer length limit (default 30)")
    add_template_arg(p)
    add_model_args(p)
    add_output_args(p, "results/behavior", "output directory for behavior.csv/.json/.html")
    add_quiet_arg(p)
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[patchlab.ModelPair, list[Any], list[Any], dict[str, Any], str]:
    """(pair, target questions, unrelated questions, what the pair is made of, title), from explicit checkpoints
    and question files or the toy world."""
    explicit = (args.vanilla, args.unlearned, args.target, args.unrelated)
    if not any(explicit):
        world, title = toy_pair(args)
        sources = {"toy_world": {"concept": world.concept, "method": world.method}}
        return world.pair, world.questions, world.unrelated_questions, sources, title
    if not all(explicit):
        raise patchlab.PatchlabValueError("--vanilla, --unlearned, --target and --unrelated go together "
                                          "(or give none of them)")
    target, unrelated = read_records(args.target), read_records(args.unrelated)
    pair, title = checkpoint_pair(args)
    return pair, target, unrelated, {"target": args.target, "unrelated": args.unrelated}, title


def carried_metrics(*sets: list[Any]) -> list[str]:
    """The TOFU likelihood metrics (:data:`patchlab.analysis.likelihood.LIKELIHOOD_METRICS`) whose fields every
    record of every set carries."""
    from patchlab.analysis.likelihood import LIKELIHOOD_METRICS

    return [name for name, metric in LIKELIHOOD_METRICS.items()
            if all(isinstance(r, dict) and all(r.get(f) is not None for f in metric.fields) for s in sets for r in s)]


def report(args: argparse.Namespace) -> None:
    """Answer, score, write behavior.csv/.json/.html and print the averages per set."""
    from patchlab.analysis.behavior import evaluate
    from patchlab.reports import figures

    out = output_dir(args.out, "behavior", overwrite=args.overwrite)
    prompt_template(args)  # a template text without {question} fails before any model loads
    pair, target, unrelated, sources, title = load_inputs(args)
    result = evaluate(pair, target, unrelated, max_new_tokens=args.max_new_tokens,
                      template=prompt_template(args, pair.tokenizer), likelihood=carried_metrics(target, unrelated),
                      progress=not args.quiet)
    result.provenance["questions"] = sources
    paths = result.write_report(out, title=f"Behavioural test: {title}")
    print(f"behavioural test on {title}: {figures.plural(len(target), 'target question')}, "
          f"{figures.plural(len(unrelated), 'unrelated question')}")
    for name, averages in result.averages.items():
        likelihood = "".join(f"  {metric} {averages[f'{metric}_before']:.3f} -> {averages[f'{metric}_after']:.3f}"
                             for metric in result.likelihood)
        print(f"{name:>9}: BLEU {averages['bleu']:6.2f}  ROUGE-L {averages['rouge_l']:.3f}  "
              f"unchanged {averages['same']:.0%}{likelihood}")
    print_written(paths)


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv)


if __name__ == "__main__":
    sys.exit(main())
