"""Unlearn a forget set from a checkpoint (GA, GradDiff, NPO, NPO+KL, DPO), optionally restricted to a weight mask.

    python analyses/unlearn.py --model path/or/hub-id --forget forget.jsonl --retain retain.jsonl \\
        --method npo_kl --lr 1e-5 --epochs 5 --out checkpoints/npo_kl
    accelerate launch analyses/unlearn.py ...      # several GPUs (DDP, or FSDP via `accelerate config`)

Data files are JSON/JSONL: strings, {"text": ...} or {"question": ..., "answer": ...} records. The output directory
holds the unlearned checkpoint (safetensors), its tokenizer and unlearn_run.json (settings and loss curve).
"""

from __future__ import annotations

import argparse
import sys

from patchlab.cli import add_model_args, model_kwargs, parser, run
from patchlab.io import output_dir
from patchlab.pair.generation import DEFAULT_TEMPLATE
from patchlab.pair import load_model
from patchlab.unlearning import METHODS, load_mask, unlearn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="checkpoint to unlearn from: local directory or hub id")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--forget", required=True, help="JSON/JSONL file of the forget set")
    p.add_argument("--retain", help="JSON/JSONL file of the retain set (needed by graddiff and npo_kl)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--out", required=True, help="output directory, checked before training: refused when it holds "
                                                 "files patchlab did not write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier patchlab checkpoint in --out "
                                                            "(files you added there are kept)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="forget sequences per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of NPO / DPO (default 0.1)")
    p.add_argument("--retain-weight", type=float, default=1.0, help="GradDiff retain weight (default 1)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="NPO+KL KL weight (default 1)")
    p.add_argument("--refusal", action="append", help="DPO preferred answer; repeat for several "
                                                      "(default: \"I don't know.\")")
    p.add_argument("--mask", help="safetensors file of bool tensors keyed by parameter name (True = may change)")
    p.add_argument("--max-length", type=int, default=256, help="truncation in tokens (default 256)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="QA prompt template with {question}")
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p, device_help="e.g. cuda (default: cpu; under accelerate launch, each process's GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def unlearn_and_report(args: argparse.Namespace) -> None:
    """Run the unlearning the arguments describe, save it to --out and print the loss change."""
    out = output_dir(args.out, "checkpoint", overwrite=args.overwrite)
    mask = load_mask(args.mask) if args.mask else None
    model = load_model(args.model, **model_kwargs(args))
    result = unlearn(model, args.forget, args.retain, tokenizer=args.tokenizer or args.model, method=args.method,
                     lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     beta=args.beta, retain_weight=args.retain_weight, kl_weight=args.kl_weight,
                     refusals=tuple(args.refusal or ("I don't know.",)), mask=mask, max_length=args.max_length,
                     template=args.template, seed=args.seed, out_dir=out, progress=not args.quiet)
    print(f"{args.method}: {result.settings['n_forget']} forget / {result.settings['n_retain']} retain examples, "
          f"{len(result.losses)} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    print(f"wrote {result.out_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: unlearn_and_report(args))


if __name__ == "__main__":
    sys.exit(main())
