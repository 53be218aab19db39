"""Weight-attribution densities from the shell: which modules and layers WAGLE and the baselines select.

With no arguments it runs on the embedded toy world (forget: the default concept's paragraphs, retain: the other
concepts' paragraphs), offline:

    python analyses/wagle_density.py
    python analyses/wagle_density.py --vanilla path/or/hub-id --forget forget.jsonl --retain retain.jsonl --out results/w

Writes ``density.csv`` (per method, module type and layer), ``density_modules.csv`` (per method and module type),
``density_modules.html`` (bars per module type) and ``density_layers.html`` (layer x module heatmaps) into --out.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from patchlab.unlearning import attribution
from patchlab.cli import add_model_args, add_output_args, model_kwargs, run
from patchlab.errors import PatchlabValueError
from patchlab.io import output_dir, read_records
from patchlab.pair import load_model, load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vanilla", help="model checkpoint: local directory or hub id (default: the toy world)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the checkpoint's)")
    p.add_argument("--forget", help="forget set: JSON/JSONL of texts or {question, answer} / {text} records")
    p.add_argument("--retain", help="retain set, same formats (also wanda's calibration set)")
    p.add_argument("--concept", help="toy-world concept to forget (toy world only)")
    p.add_argument("--methods", default=",".join(attribution.METHODS),
                   help=f"comma-separated attribution methods (default {','.join(attribution.METHODS)})")
    p.add_argument("--ratio", type=float, default=0.8, help="fraction of weights selected (default 0.8)")
    p.add_argument("--per-layer", action="store_true", help="select the top ratio within each layer")
    p.add_argument("--gamma", type=float, default=1.0, help="WAGLE's Hessian-diagonal parameter (default 1.0)")
    p.add_argument("--forget-loss", default="ascent", choices=["ascent", "nll"], help="WAGLE's l_f convention")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--max-length", type=int, default=256, help="truncation, in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    add_model_args(p)
    add_output_args(p, "results/wagle_density")
    return p.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """(model, tokenizer, forget, retain, title) from explicit files or the toy world."""
    if args.vanilla is None and args.forget is None and args.retain is None:
        from patchlab import toy
        from patchlab.toy.cache import unlearn_data

        concept = args.concept or toy.DEFAULT_CONCEPT
        model, tok = toy.vanilla()
        forget, retain = unlearn_data(toy.world(), concept)
        return model, tok, forget, retain, f"toy world: {concept}"
    if not (args.vanilla and args.forget and args.retain):
        raise PatchlabValueError("--vanilla, --forget and --retain go together (or give none of them)")
    forget, retain = read_records(args.forget), read_records(args.retain)
    model = load_model(args.vanilla, **model_kwargs(args))
    return model, load_tokenizer(args.tokenizer or args.vanilla), forget, retain, args.vanilla


def report(args: argparse.Namespace) -> None:
    """Score, mask and measure the density of every method; write the tables and figures, print a summary."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = output_dir(args.out, "density", overwrite=args.overwrite)
    model, tok, forget, retain, title = load_inputs(args)
    frames, masks = {}, {}
    for method in methods:
        scores = attribution.scores(model, forget, retain, method=method, gamma=args.gamma,
                                    forget_loss=args.forget_loss, tokenizer=tok, batch_size=args.batch_size,
                                    max_length=args.max_length, seed=args.seed)
        masks[method] = attribution.mask(scores, args.ratio, per_layer=args.per_layer)
        frames[method] = attribution.density(masks[method], model)
    densities = attribution.density_report(frames)
    paths = densities.write(out)
    print(f"weight attribution on {title}: ratio {args.ratio}{' per layer' if args.per_layer else ''}")
    print(densities.by_method().round(3).to_string())
    for other in methods[1:]:
        print(f"mask overlap (Jaccard) {methods[0]} vs {other}: {attribution.overlap(masks[methods[0]], masks[other]):.3f}")
    for path in paths:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
