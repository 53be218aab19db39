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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import patchlab
from patchlab.cli import (add_model_args, add_output_args, add_quiet_arg, add_template_arg, comma_list, int_list,
                          model_kwargs, parser, print_written, prompt_template, run_script)
from patchlab.cli_pairs import add_pair_args, check_toy_world_flags
from patchlab.io import read_records
from patchlab.cli import setting_arg
from patchlab.cli_pairs import check_checkpoint_flags, toy_model_kwargs

if TYPE_CHECKING:
    from patchlab.probes import AuditCase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    add_pair_args(p, placement=False, several=True)
    p.add_argument("--labels", help="comma-separated names of the --unlearned checkpoints (default: their paths)")
    p.add_argument("--retain", help="a checkpoint that never saw the concept (optional)")
    p.add_argument("--questions", help="JSON/JSONL target questions: strings or {question, answer?} records "
                                       "(without answers the vanilla greedy answers are the reference); on the toy "
                                       "world they replace the concept's questions")
    p.add_argument("--unrelated", help="JSON/JSONL unrelated questions, same forms (behaviour, benign relearning)")
    p.add_argument("--concept", help="comma-separated toy-world concepts (toy world only; default its first)")
    p.add_argument("--method", help="comma-separated toy unlearning methods (toy world only; default graddiff)")
    p.add_argument("--sanity", action="store_true",
                   help="toy world: also audit the retain model in the unlearned model's place (should be erased)")
    p.add_argument("--trust", help="a meta-evaluation's trust file (python analyses/meta_eval.py --ship FILE): the "
                                   "overall verdict counts the probes it trusts (toy world default: the shipped one)")
    p.add_argument("--probes", help="comma-separated probes (default: all of patchlab.probes.PROBES)")
    p.add_argument("--n-tokens", type=int, help="vanilla reference answer length, tokens (default 30)")
    add_template_arg(p)
    p.add_argument("--n-boot", type=int, help="bootstrap resamples over questions (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the bootstrap, the question halves and fine-tuning (default 0)")
    p.add_argument("--window", type=int, help="KRS: layers per window (default 5)")
    p.add_argument("--relearn-steps", type=int_list, help="relearning: step counts, e.g. 0,5,10,20,40")
    p.add_argument("--relearn-lr", type=float, help="relearning: AdamW learning rate (default 1e-5; toy world 1e-3)")
    p.add_argument("--bits", type=int_list, help="quantization: bit widths, e.g. 8,4")
    p.add_argument("--probe-setting", action="append", type=setting_arg, default=[], metavar="PROBE.OPTION=VALUE",
                   help="any probe's option, a --plugin probe's included (repeatable; the value read as JSON, else as "
                        "text), e.g. uds.threshold=0.1, krs.positions=middle, relearning.batch_size=4; "
                        "'common.OPTION' sets a shared one. Unknown options are refused before any model loads")
    add_model_args(p)
    add_output_args(p, "results/audit", "output directory for audit.json/.csv/.html and the per-probe results")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on the toy world 2 threads on a busy 2-core machine ran 13x slower)")
    add_quiet_arg(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, toy: bool) -> dict[str, dict[str, Any]]:
    """The audit's settings overrides: the toy world's (:data:`patchlab.toy.audit.TOY_SETTINGS`) on the toy world, then
    the options given on the command line (the named flags and ``--probe-setting``).

    Raises:
        PatchlabValueError: an option given both by its own flag and by ``--probe-setting``.
    """
    from patchlab.toy.audit import TOY_SETTINGS

    settings: dict[str, dict[str, Any]] = {k: dict(v) for k, v in TOY_SETTINGS.items()} if toy else {}
    given = {("common", "n_tokens"): args.n_tokens, ("common", "n_boot"): args.n_boot, ("common", "seed"): args.seed,
             ("krs", "window"): args.window, ("relearning", "steps"): args.relearn_steps,
             ("relearning", "lr"): args.relearn_lr, ("quantization", "bits"): args.bits,
             ("common", "template"): None if args.template in ("default", "chat") else prompt_template(args)}
    generic = {(section, key): value for section, key, value in args.probe_setting}
    twice = sorted(f"{section}.{key}" for section, key in generic if given.get((section, key)) is not None)
    if twice:
        raise patchlab.PatchlabValueError(f"--probe-setting {', '.join(twice)} repeats an option its own flag sets")
    for (section, key), value in {**generic, **{k: v for k, v in given.items() if v is not None}}.items():
        settings.setdefault(section, {})[key] = value
    return settings


def read_question_file(path: str | None, what: str) -> list[Any] | None:
    """The :class:`~patchlab.pair.qa.QA` list of a --questions / --unrelated file (``what``: ``"target"`` /
    ``"unrelated"``), parsed and checked (:func:`patchlab.probes.base.as_questions`) before any model loads; ``None``
    when not given.

    Raises:
        PatchlabFileError: the file does not exist.
        PatchlabValueError: it is not JSON/JSONL, holds no list, no question, or a malformed one (naming the file).
    """
    from patchlab.probes.base import as_questions

    if path is None:
        return None
    records = read_records(path)
    try:
        return as_questions(records, what)
    except patchlab.PatchlabValueError as err:
        raise patchlab.PatchlabValueError(f"{path}: {err}") from err


def cases_from_args(args: argparse.Namespace) -> list[AuditCase]:
    """The audited pairs: the toy world's (on --questions / --unrelated when given), or the given checkpoints (the
    vanilla model loaded once). The flags, then the question files are checked before any model loads."""
    from patchlab.pair import load_model, load_tokenizer
    from patchlab.probes import AuditCase
    from patchlab.toy.audit import toy_cases

    toy = args.vanilla is None and args.unlearned is None
    if toy:
        check_toy_world_flags(args)
    else:
        if not (args.vanilla and args.unlearned and args.questions):
            raise patchlab.PatchlabValueError("--vanilla, --unlearned and --questions go together (or give none of "
                                              "them)")
        check_checkpoint_flags(args)
        labels = comma_list(args.labels) or list(args.unlearned)
        if len(labels) != len(args.unlearned):
            raise patchlab.PatchlabValueError(f"--labels names {len(labels)} checkpoints but --unlearned gives "
                                              f"{len(args.unlearned)}")
    questions = read_question_file(args.questions, "target")
    unrelated = read_question_file(args.unrelated, "unrelated")
    if toy:
        return toy_cases(**({"methods": comma_list(args.method)} if args.method else {}),
                         concepts=comma_list(args.concept), sanity=args.sanity, progress=not args.quiet,
                         questions=questions, unrelated=unrelated, **toy_model_kwargs(args))
    kwargs = model_kwargs(args)
    tok = load_tokenizer(args.tokenizer or args.vanilla)
    vanilla = load_model(args.vanilla, **kwargs)
    retain = load_model(args.retain, **kwargs) if args.retain else None
    return [AuditCase(label, patchlab.load_pair(vanilla, path, tokenizer=tok, adapter_base=args.adapter_base, **kwargs),
                      questions, unrelated, retain,
                      {"vanilla": args.vanilla, "unlearned": path, "retain": args.retain})
            for label, path in zip(labels, args.unlearned)]


def report(args: argparse.Namespace) -> None:
    """Run the audit (resumable in --out), write audit.json/.csv/.html and print the verdict table."""
    import torch

    from patchlab.meta_evaluation import read_trust
    from patchlab.probes import PROBES, audit_many, resolve_settings
    from patchlab.probes.registry import select

    if args.threads < 1:
        raise patchlab.PatchlabValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    toy = args.vanilla is None and args.unlearned is None
    settings = settings_from_args(args, toy)
    resolve_settings(list(PROBES.values()), settings)  # bad probes or settings fail before any model loads
    select(comma_list(args.probes))
    trust = read_trust(args.trust) if args.trust else None
    if trust is None and toy:
        from patchlab.toy.zoo import TRUST_FILE

        trust = read_trust(TRUST_FILE) if TRUST_FILE.is_file() else None
    cases = cases_from_args(args)
    if args.template == "chat":  # the tokenizer's chat template, once the pair's tokenizer is at hand
        settings.setdefault("common", {})["template"] = prompt_template(args, cases[0].pair.tokenizer)
    result = audit_many(cases, probes=comma_list(args.probes), settings=settings, out_dir=args.out,
                        overwrite=args.overwrite, progress=not args.quiet, trust=trust)
    print(f"residual-knowledge audit of {', '.join(result.labels)} ({len(cases[0].questions)} target questions)")
    print(result.verdicts().to_string())
    for run in result.runs:
        print(f"{run.label}: {run.overall()}")
    for row in result.overall().itertuples():
        print(f"overall, {row.label}: {row.verdict} (from {row.trusted or 'no probe'})")
    if trust is not None:
        for probe, why in trust["trusted"].items():
            print(f"  {probe}: {why}")
    print_written([Path(args.out) / f"audit.{kind}" for kind in ("json", "csv", "html")])


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
