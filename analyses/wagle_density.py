"""Weight-attribution densities from the shell: which modules and layers WAGLE and the baselines select.

With no arguments it runs on the embedded toy world (forget: the default concept's paragraphs, retain: the other
concepts' paragraphs), offline:

    python analyses/wagle_density.py
    python analyses/wagle_density.py --vanilla path/or/hub-id --forget forget.jsonl --retain retain.jsonl --out results/w

Writes ``density.json`` (every density, the model with a hash of its weights and the settings;
``patchlab.load_result`` reads it back), ``density.csv`` (per method, module type and layer), ``density_modules.csv``
(per method and module type), ``density_modules.html`` (bars per module type) and ``density_layers.html`` (layer x
module heatmaps) into --out; the pages share one plotly.js file written beside them.

From attribution to masked unlearning on the command line: ``--save-mask FILE`` saves the first method's mask (or
the ``--mask-method`` one) as safetensors as soon as it is computed, for ``analyses/unlearn.py --mask FILE``:

    python analyses/wagle_density.py --vanilla ckpt/vanilla --forget forget.jsonl --retain retain.jsonl \\
        --methods wagle,random --ratio 0.5 --save-mask wagle.safetensors
    python analyses/unlearn.py --model ckpt/vanilla --forget forget.jsonl --retain retain.jsonl \\
        --mask wagle.safetensors --method graddiff --out runs/masked
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from patchlab.cli import (add_model_args, add_output_args, add_quiet_arg, comma_list, model_kwargs, output_file,
                          parser, print_written, run_script)
from patchlab.defaults import ATTRIBUTION_METHODS
from patchlab.errors import PatchlabValueError
from patchlab.io import output_dir
from patchlab.cli_pairs import check_checkpoint_flags, check_toy_world_flags


#: The arguments recorded in density.json's provenance: how the masks were drawn.
SETTINGS = ("concept", "methods", "ratio", "per_layer", "gamma", "forget_loss", "batch_size", "max_length", "seed",
            "forget", "retain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    p.add_argument("--vanilla", help="model checkpoint: local directory or hub id (default: the toy world)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the checkpoint's)")
    p.add_argument("--forget", help="forget set: JSON/JSONL of texts or {question, answer} / {text} records")
    p.add_argument("--retain", help="retain set, same formats (also wanda's calibration set)")
    p.add_argument("--concept", help="toy-world concept to forget (toy world only)")
    p.add_argument("--methods", default=",".join(ATTRIBUTION_METHODS),
                   help=f"comma-separated attribution methods (default {','.join(ATTRIBUTION_METHODS)}; a --plugin "
                        "may register more with patchlab.unlearning.attribution.register_scorer)")
    p.add_argument("--ratio", type=float, default=0.8, help="fraction of weights selected (default 0.8)")
    p.add_argument("--per-layer", action="store_true", help="select the top ratio within each layer")
    p.add_argument("--gamma", type=float, default=1.0, help="WAGLE's Hessian-diagonal parameter (default 1.0)")
    p.add_argument("--forget-loss", default="ascent", choices=["ascent", "nll"], help="WAGLE's l_f convention")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--max-length", type=int, default=256, help="truncation, in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--save-mask", metavar="FILE", help="save the mask of --mask-method as a safetensors file of bool "
                   "tensors (True = may change), the input of analyses/unlearn.py --mask; checked before any compute "
                   "(an existing FILE is replaced only with --overwrite)")
    p.add_argument("--mask-method", help="the method whose mask --save-mask saves (default: the first of --methods)")
    add_model_args(p)
    add_output_args(p, "results/wagle_density")
    add_quiet_arg(p)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[str], str | None, Path | None]:
    """(methods, the method whose mask is saved, the checked --save-mask path), before any compute.

    Raises:
        PatchlabValueError: no method, an unknown one, or a --mask-method not among them (or without --save-mask).
        PatchlabFileError: --save-mask cannot be written (see :func:`patchlab.cli.output_file`).
    """
    from patchlab.unlearning.attribution import SCORERS  # built-ins and those a --plugin registered

    methods = comma_list(args.methods)
    unknown = [m for m in methods if m not in SCORERS]
    if not methods or unknown:
        raise PatchlabValueError(f"--methods must name some of {', '.join(SCORERS)}, got {args.methods!r}")
    if args.mask_method is not None and args.save_mask is None:
        raise PatchlabValueError("--mask-method chooses the mask --save-mask saves: give --save-mask FILE too")
    if args.save_mask is None:
        return methods, None, None
    chosen = args.mask_method or methods[0]
    if chosen not in methods:
        raise PatchlabValueError(f"--mask-method {chosen!r} is not one of --methods ({', '.join(methods)})")
    return methods, chosen, output_file(args.save_mask, overwrite=args.overwrite, what="mask file")


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """(model, tokenizer, forget, retain, title) from explicit files (read and checked before the model loads) or
    the toy world (in --dtype on --device when given)."""
    from patchlab.pair import load_model, load_tokenizer

    if args.vanilla is None and args.forget is None and args.retain is None:
        check_toy_world_flags(args)
        from patchlab import toy
        from patchlab.toy.cache import unlearn_data

        concept = args.concept or toy.DEFAULT_CONCEPT
        model, tok = toy.vanilla()
        forget, retain = unlearn_data(toy.world(), concept)
        return load_model(model, **model_kwargs(args)), tok, forget, retain, f"toy world: {concept}"
    if not (args.vanilla and args.forget and args.retain):
        raise PatchlabValueError("--vanilla, --forget and --retain go together (or give none of them)")
    check_checkpoint_flags(args)
    from patchlab.unlearning.data import read_data

    forget, retain = read_data(args.forget, "forget"), read_data(args.retain, "retain")
    model = load_model(args.vanilla, **model_kwargs(args))
    return model, load_tokenizer(args.tokenizer or args.vanilla), forget, retain, args.vanilla


def report(args: argparse.Namespace, saved: dict[str, Path]) -> None:
    """Score, mask and measure the density of every method; save the chosen mask as soon as it exists (recorded in
    ``saved``); write the tables and figures, print a summary."""
    from patchlab.unlearning import attribution, save_mask

    methods, mask_method, mask_path = plan(args)
    out = output_dir(args.out, "density", overwrite=args.overwrite)
    model, tok, forget, retain, title = load_inputs(args)
    frames, masks = {}, {}
    for method in methods:
        scores = attribution.scores(model, forget, retain, method=method, gamma=args.gamma,
                                    forget_loss=args.forget_loss, tokenizer=tok, batch_size=args.batch_size,
                                    max_length=args.max_length, seed=args.seed, progress=not args.quiet)
        masks[method] = attribution.mask(scores, args.ratio, per_layer=args.per_layer)
        frames[method] = attribution.density(masks[method], model)
        if method == mask_method:
            saved[method] = save_mask(masks[method], mask_path)
    settings = {name: getattr(args, name) for name in SETTINGS}
    densities = attribution.density_report(frames, model=model, source=args.vanilla or "toy world: vanilla",
                                           settings=settings)
    paths = densities.write_report(out)
    print(f"weight attribution on {title}: ratio {args.ratio}{' per layer' if args.per_layer else ''}")
    print(densities.by_method().round(3).to_string())
    for other in methods[1:]:
        jaccard = attribution.overlap(masks[methods[0]], masks[other])
        print(f"mask overlap (Jaccard) {methods[0]} vs {other}: {jaccard:.3f}")
    print_written([*saved.values(), *paths.values()])


def main(argv: list[str] | None = None) -> int:
    saved: dict[str, Path] = {}
    return run_script(parse_args, lambda args: report(args, saved), argv,
                      extra=lambda: "; ".join(f"the {m} mask was saved to {p}" for m, p in saved.items()))


if __name__ == "__main__":
    sys.exit(main())
