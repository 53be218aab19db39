"""Residual-knowledge audit from the shell: KRS, logit lens, UDS, relearning, quantization and behaviour probes side
by side.

With no checkpoint it audits the embedded toy world offline (default concept, graddiff-unlearned, with the shipped
retain model); the output directory is resumable (a finished probe is not recomputed):

    python analyses/audit.py
    python analyses/audit.py --method graddiff,npo --sanity          # + the retain model in the unlearned slot
    python analyses/audit.py --vanilla path/or/hub-id --unlearned ckpt-a ckpt-b --labels a,b \\
        --questions target.jsonl --unrelated unrelated.jsonl --retain retain-ckpt --out results/audit-real
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import patchlab
from patchlab.probes import PROBES, TOY_SETTINGS, AuditCase, audit_many, resolve_settings, toy_cases
from patchlab.probes.registry import select
from patchlab.cli import (add_model_args, add_output_args, add_pair_args, add_quiet_arg, check_toy_world_flags,
                          comma_list, model_kwargs, parser, run_script)
from patchlab.io import read_records
from patchlab.pair import load_model, load_tokenizer


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in comma_list(text) or []]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_pair_args(p, placement=False, several=True)
    p.add_argument("--labels", help="comma-separated names of the --unlearned checkpoints (default: their paths)")
    p.add_argument("--retain", help="a checkpoint that never saw the concept (optional)")
    p.add_argument("--questions", help="JSON/JSONL target questions: strings or {question, answer?} records "
                                       "(without answers the vanilla greedy answers are the reference)")
    p.add_argument("--unrelated", help="JSON/JSONL unrelated questions, same forms (behaviour, benign relearning)")
    p.add_argument("--concept", help="comma-separated toy-world concepts (toy world only; default its first)")
    p.add_argument("--method", default="graddiff", help="comma-separated toy unlearning methods (toy world only)")
    p.add_argument("--sanity", action="store_true",
                   help="toy world: also audit the retain model in the unlearned model's place (should be erased)")
    p.add_argument("--probes", help=f"comma-separated probes (default all: {','.join(PROBES)})")
    p.add_argument("--n-tokens", type=int, help="vanilla reference answer length, tokens (default 30)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples over questions (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the bootstrap, the question halves and fine-tuning (default 0)")
    p.add_argument("--window", type=int, help="KRS: layers per window (default 5)")
    p.add_argument("--relearn-steps", type=_ints, help="relearning: step counts, e.g. 0,5,10,20,40")
    p.add_argument("--relearn-lr", type=float, help="relearning: AdamW learning rate (default 1e-5; toy world 1e-3)")
    p.add_argument("--bits", type=_ints, help="quantization: bit widths, e.g. 8,4")
    add_model_args(p)
    add_output_args(p, "results/audit", "output directory for audit.json/.csv/.html and the per-probe results")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on the toy world 2 threads on a busy 2-core machine ran 13x slower)")
    add_quiet_arg(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, toy: bool) -> dict[str, dict[str, Any]]:
    """The audit's settings overrides: the toy world's (:data:`patchlab.probes.TOY_SETTINGS`) on the toy world, then
    the options given on the command line."""
    settings: dict[str, dict[str, Any]] = {k: dict(v) for k, v in TOY_SETTINGS.items()} if toy else {}
    given = {("common", "n_tokens"): args.n_tokens, ("common", "n_boot"): args.n_boot, ("common", "seed"): args.seed,
             ("krs", "window"): args.window, ("relearning", "steps"): args.relearn_steps,
             ("relearning", "lr"): args.relearn_lr, ("quantization", "bits"): args.bits}
    for (section, key), value in given.items():
        if value is not None:
            settings.setdefault(section, {})[key] = value
    return settings


def cases_from_args(args: argparse.Namespace) -> list[AuditCase]:
    """The audited pairs: the toy world's, or the given checkpoints (the vanilla model loaded once)."""
    if args.vanilla is None and args.unlearned is None:
        check_toy_world_flags(args)
        return toy_cases(comma_list(args.method), comma_list(args.concept), sanity=args.sanity, progress=not args.quiet)
    if not (args.vanilla and args.unlearned and args.questions):
        raise patchlab.PatchlabValueError("--vanilla, --unlearned and --questions go together (or give none of them)")
    labels = comma_list(args.labels) or list(args.unlearned)
    if len(labels) != len(args.unlearned):
        raise patchlab.PatchlabValueError(f"--labels names {len(labels)} checkpoints but --unlearned gives "
                                          f"{len(args.unlearned)}")
    kwargs = model_kwargs(args)
    tok = load_tokenizer(args.tokenizer or args.vanilla)
    vanilla = load_model(args.vanilla, **kwargs)
    retain = load_model(args.retain, **kwargs) if args.retain else None
    questions = read_records(args.questions)
    unrelated = read_records(args.unrelated) if args.unrelated else None
    return [AuditCase(label, patchlab.load_pair(vanilla, path, tokenizer=tok, adapter_base=args.adapter_base, **kwargs),
                      questions, unrelated, retain,
                      {"vanilla": args.vanilla, "unlearned": path, "retain": args.retain})
            for label, path in zip(labels, args.unlearned)]


def report(args: argparse.Namespace) -> None:
    """Run the audit (resumable in --out), write audit.json/.csv/.html and print the verdict table."""
    if args.threads < 1:
        raise patchlab.PatchlabValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    toy = args.vanilla is None and args.unlearned is None
    settings = settings_from_args(args, toy)
    resolve_settings(list(PROBES.values()), settings)  # bad probes or settings fail before any model loads
    select(comma_list(args.probes))
    cases = cases_from_args(args)
    result = audit_many(cases, probes=comma_list(args.probes), settings=settings, out_dir=args.out,
                        overwrite=args.overwrite, progress=not args.quiet)
    print(f"residual-knowledge audit of {', '.join(result.labels)} ({len(cases[0].questions)} target questions)")
    print(result.verdicts().to_string())
    for run in result.runs:
        print(f"{run.label}: {run.overall()}")
    for kind in ("json", "csv", "html"):
        print(f"wrote {kind}: {args.out}/audit.{kind}")


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
