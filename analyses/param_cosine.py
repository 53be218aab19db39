"""Parameter diffs from the shell: cosine similarity, 1 - cos, angle and relative L2 change of every weight tensor,
vanilla vs unlearned, pooled per module type and per layer.

With no arguments it compares the embedded toy world's vanilla model with its unlearned copy, offline:

    python analyses/param_cosine.py
    python analyses/param_cosine.py --vanilla ckpt/vanilla --unlearned ckpt/unlearned --out results/pc

Checkpoint directories are streamed tensor by tensor from their safetensors files (two 7B checkpoints never sit in
memory together). Fine-tuning unlearning changes weights so little that the cosine reads 1.0 everywhere, so the
summary prints 1 - cos (computed without cancellation), the angle in degrees and the relative L2 change |b-a|/|a|
in scientific notation. Writes ``paramdiff.json`` (every number and both checkpoints with a hash of their weights;
``patchlab.load_result`` reads it back), ``paramdiff.csv`` (per tensor), ``paramdiff_modules.csv`` (per module
type), ``paramdiff_layers_<metric>.csv`` (layer x module) and ``paramdiff_<metric>.html`` (heatmap; log colour scale
except for the cosine) for cosine, one_minus_cos, angle_deg and rel_l2, plus ``value_vectors.csv`` with
``--value-vectors N``, into --out; the pages share one plotly.js file written beside them.
"""

from __future__ import annotations

import argparse
import sys

import patchlab
from patchlab.cli import add_output_args, add_quiet_arg, parser, print_written, run_script
from patchlab.cli_pairs import checkpoints_title, toy_pair
from patchlab.io import output_dir
from patchlab.cli_pairs import check_checkpoint_flags

#: The per-module summary printed: how much each module type moved.
SUMMARY = ["module", "numel", "one_minus_cos", "angle_deg", "rel_l2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    p.add_argument("--vanilla", help="vanilla checkpoint directory (safetensors) (default: the toy world)")
    p.add_argument("--unlearned", help="unlearned checkpoint directory (safetensors)")
    p.add_argument("--concept", help="toy-world concept (toy world only)")
    p.add_argument("--method", help="toy-world unlearning method (toy world only; default graddiff)")
    p.add_argument("--value-vectors", type=int, default=0, metavar="N",
                   help="also list the N most changed MLP value vectors with their top vocabulary tokens "
                        "(loads both models and their tokenizer)")
    p.add_argument("--top-tokens", type=int, help="vocabulary tokens shown per value vector (with --value-vectors; "
                                                   "default 5)")
    add_output_args(p, "results/param_cosine")
    add_quiet_arg(p)
    return p.parse_args(argv)


def load_models(args: argparse.Namespace) -> tuple[object, str | None, str]:
    """(vanilla, unlearned, title): the toy world's pair and ``None``, or the two checkpoint directories."""
    if args.vanilla is None and args.unlearned is None:
        world, title = toy_pair(args)
        return world.pair, None, title
    if not (args.vanilla and args.unlearned):
        raise patchlab.PatchlabValueError("--vanilla and --unlearned go together (or give neither)")
    check_checkpoint_flags(args)
    return args.vanilla, args.unlearned, checkpoints_title(args)


def report(args: argparse.Namespace) -> None:
    """Compare the two models' parameters; write the tables and heatmaps, print a summary."""
    if args.top_tokens is not None and args.value_vectors <= 0:
        raise patchlab.PatchlabValueError("--top-tokens sets how many tokens --value-vectors N lists: give "
                                          "--value-vectors N too")
    from patchlab.analysis.paramdiff import paramdiff, value_vector_changes

    out = output_dir(args.out, "paramdiff", overwrite=args.overwrite)
    vanilla, unlearned, title = load_models(args)
    diff = paramdiff(vanilla, unlearned, progress=not args.quiet)  # checks both directories before loading
    if args.value_vectors > 0:
        pair = vanilla if unlearned is None else patchlab.load_pair(vanilla, unlearned)
        diff.value_vectors = value_vector_changes(pair, top=args.value_vectors, **(
            {"top_tokens": args.top_tokens} if args.top_tokens is not None else {}))
    paths = diff.write_report(out)
    modules = diff.by_module()
    print(f"parameter diff on {title}: {len(diff.to_frame())} tensors")
    print(modules[SUMMARY].to_string(index=False, float_format=lambda x: f"{x:.3e}"))
    if diff.value_vectors is not None:
        print(diff.value_vectors.drop(columns="cosine").to_string(index=False, float_format=lambda x: f"{x:.3e}"))
    print_written(paths)


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, report, argv)


if __name__ == "__main__":
    sys.exit(main())
