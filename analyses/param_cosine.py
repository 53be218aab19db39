"""Parameter diffs from the shell: cosine similarity and relative L2 change of every weight tensor, vanilla vs
unlearned, pooled per module type and per layer.

With no arguments it compares the embedded toy world's vanilla model with its unlearned copy, offline:

    python analyses/param_cosine.py
    python analyses/param_cosine.py --vanilla ckpt/vanilla --unlearned ckpt/unlearned --out results/pc

Checkpoint directories are streamed tensor by tensor from their safetensors files (two 7B checkpoints never sit in
memory together). Writes ``paramdiff.csv`` (per tensor), ``paramdiff_modules.csv`` (per module type),
``paramdiff_layers_<metric>.csv`` (layer x module) and ``paramdiff_<metric>.html`` (heatmap) for cosine and
rel_l2, plus ``value_vectors.csv`` with ``--value-vectors N`` into --out.
"""

from __future__ import annotations

import argparse
import sys

import patchlab
from patchlab.cli import add_output_args, run
from patchlab.io import output_dir
from patchlab.analysis.paramdiff import METRICS, paramdiff, value_vector_changes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vanilla", help="vanilla checkpoint directory (safetensors) (default: the toy world)")
    p.add_argument("--unlearned", help="unlearned checkpoint directory (safetensors)")
    p.add_argument("--concept", help="toy-world concept (toy world only)")
    p.add_argument("--method", default="graddiff", help="toy-world unlearning method (toy world only)")
    p.add_argument("--value-vectors", type=int, default=0, metavar="N",
                   help="also list the N most changed MLP value vectors with their top vocabulary tokens "
                        "(loads both models and their tokenizer)")
    p.add_argument("--top-tokens", type=int, default=5, help="vocabulary tokens shown per value vector")
    add_output_args(p, "results/param_cosine")
    return p.parse_args(argv)


def load_models(args: argparse.Namespace) -> tuple[object, str | None, str]:
    """(vanilla, unlearned, title): the toy world's pair and ``None``, or the two checkpoint directories."""
    if args.vanilla is None and args.unlearned is None:
        from patchlab import toy

        world = toy.pair(**({"concept": args.concept} if args.concept else {}), method=args.method)
        return world.pair, None, f"toy world: {world.concept} ({world.method})"
    if not (args.vanilla and args.unlearned):
        raise patchlab.PatchlabValueError("--vanilla and --unlearned go together (or give neither)")
    return args.vanilla, args.unlearned, f"{args.unlearned} vs {args.vanilla}"


def report(args: argparse.Namespace) -> None:
    """Compare the two models' parameters; write the tables and heatmaps, print a summary."""
    out = output_dir(args.out, "paramdiff", overwrite=args.overwrite)
    vanilla, unlearned, title = load_models(args)
    diff = paramdiff(vanilla, unlearned)  # checks both directories before any model is loaded
    values = None
    if args.value_vectors > 0:
        pair = vanilla if unlearned is None else patchlab.load_pair(vanilla, unlearned)
        values = value_vector_changes(pair, top=args.value_vectors, top_tokens=args.top_tokens)
    paths = diff.write_report(out, value_vectors=values)
    modules = diff.by_module()
    print(f"parameter diff on {title}: {len(diff.table)} tensors")
    print(modules[["module", "numel", *METRICS]].to_string(index=False, float_format=lambda x: f"{x:.6f}"))
    if values is not None:
        print(values.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    for path in paths:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
