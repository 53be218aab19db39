"""Meta-evaluation of the audit's probes on a zoo of models: per probe, faithfulness (AUC of separating models that
know the target from models that never saw it, with a bootstrap interval) and robustness (R under relearning, Q
under quantization, their harmonic mean HM).

With no --zoo it builds the toy world's zoo offline (default concept; shipped from-scratch members, fine-tuned and
unlearned members built on first use and cached) and runs each member in-process; the output directory is
resumable per member:

    python analyses/meta_eval.py
    python analyses/meta_eval.py --ray                       # each member a Ray task on a local ray.init()
    python analyses/meta_eval.py --zoo zoo.yaml --ray-address auto --num-gpus 1 --out results/meta-eval-tofu
    python analyses/meta_eval.py --ship patchlab/toy/assets/meta_eval.json --overwrite   # the audit's trust file

A zoo file (JSON or YAML) names the target questions and each checkpoint's role (full, positive, negative, retain,
unlearned); see patchlab/zoo.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import patchlab
from patchlab.cli import (add_output_args, add_quiet_arg, comma_list, float_list, int_list, output_file, parser, print_written,
                          run_script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--zoo", help="a zoo file (JSON or YAML); default: the toy world's zoo")
    p.add_argument("--concept", help="toy world: the target concept (default its first)")
    p.add_argument("--method", help="toy world: comma-separated unlearning methods (default graddiff,npo,rmu)")
    p.add_argument("--strengths", type=float_list,
                   help="toy world: comma-separated unlearning strengths, learning-rate multiples of each method's "
                        "toy settings (default 0.5,1,2)")
    p.add_argument("--members", help="toy world: comma-separated from-scratch members, shipped names "
                                     "(half-a-s1...) or checkpoint directories (default the four shipped ones)")
    p.add_argument("--seeds", type=int_list, help="toy world: seeds of the fine-tuned members (default 1,2)")
    p.add_argument("--probes", help="comma-separated probes (default: every probe with a knowledge reading)")
    p.add_argument("--relearn-steps", type=int, help="relearning attack: fine-tuning steps (default 20)")
    p.add_argument("--relearn-lr", type=float, help="relearning attack: AdamW learning rate (default 1e-3)")
    p.add_argument("--bits", type=int, help="quantization attack: bit width (default 4)")
    p.add_argument("--ray", action="store_true", help="run each member as a Ray task (ray.init() locally)")
    p.add_argument("--ray-address", help="a Ray cluster's address (implies --ray), e.g. auto or ray://host:10001")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray task (default 0)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray task (default 1)")
    p.add_argument("--ship", help="also write the compact trust file the audit reads (e.g. "
                                  "patchlab/toy/assets/meta_eval.json)")
    add_output_args(p, "results/meta_eval", "output directory for meta_eval.json/.csv/.html and the per-member "
                                            "records")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    add_quiet_arg(p)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python analyses/meta_eval.py", *(shlex.quote(a) for a in given)])
    return args


def report(args: argparse.Namespace) -> None:
    """Build or read the zoo, meta-evaluate it (resumable in --out), write the report and print the table."""
    import torch

    from patchlab.meta_evaluation import check_attacks, meta_eval
    from patchlab.zoo import load_zoo

    if args.threads < 1:
        raise patchlab.PatchlabValueError(f"--threads must be >= 1, got {args.threads}")
    if args.num_gpus < 0 or args.num_cpus <= 0:
        raise patchlab.PatchlabValueError("--num-gpus must be >= 0 and --num-cpus > 0")
    torch.set_num_threads(args.threads)
    ship = output_file(args.ship, overwrite=args.overwrite, what="trust file") if args.ship else None
    attacks = {}
    if args.relearn_steps is not None or args.relearn_lr is not None:
        attacks["relearning"] = {k: v for k, v in (("steps", args.relearn_steps), ("lr", args.relearn_lr))
                                 if v is not None}
    if args.bits is not None:
        attacks["quantization"] = {"bits": args.bits}
    check_attacks(attacks)  # a bad attack setting fails before the zoo is built
    start = time.perf_counter()
    if args.zoo is not None:
        if args.concept or args.method or args.seeds or args.members or args.strengths:
            raise patchlab.PatchlabValueError("--concept, --method, --strengths, --members and --seeds describe the "
                                              "toy zoo; not with --zoo")
        zoo, settings = load_zoo(args.zoo), None
    else:
        from patchlab.toy import zoo as toy_zoo

        kwargs = {"methods": comma_list(args.method)} if args.method else {}
        if args.seeds is not None:
            kwargs["seeds"] = args.seeds
        if args.strengths is not None:
            kwargs["strengths"] = args.strengths
        if args.members:
            kwargs["members"] = [toy_zoo.ZOO_ASSETS / m if m in toy_zoo.ZOO_MEMBERS else Path(m)
                                 for m in comma_list(args.members)]
        zoo = toy_zoo.toy(args.concept, progress=not args.quiet, **kwargs)
        settings = toy_zoo.META_SETTINGS
    result = meta_eval(zoo, comma_list(args.probes), settings=settings, attacks=attacks, out_dir=args.out,
                       overwrite=args.overwrite, ray=args.ray, ray_address=args.ray_address, num_gpus=args.num_gpus,
                       num_cpus=args.num_cpus, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"meta-evaluation on {result.target}: {len(result.models)} models, {seconds:.0f} s")
    print(result.to_frame().drop(columns="orientation").to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print_written([Path(args.out) / f"meta_eval.{kind}" for kind in ("json", "csv", "html")])
    if ship is not None:
        print_written([result.write_trust(ship, command=args.command)])


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())

