"""Unlearn a forget set from a checkpoint with a registered fine-tuning method, optionally masked or as a LoRA adapter.

With no arguments it runs on the embedded toy world: the default concept's paragraphs as forget set, every other
concept's paragraphs as retain set, graddiff with its toy settings, written to results/unlearn/graddiff:

    python analyses/unlearn.py
    python analyses/unlearn.py --method rmu --concept "Osmarek Lantern"
    python analyses/unlearn.py --model path/or/hub-id --forget forget.jsonl --retain retain.jsonl \\
        --method npo_kl --lr 1e-5 --epochs 5 --beta 0.1 --out checkpoints/npo_kl
    python analyses/unlearn.py --model path/or/hub-id --forget forget.jsonl --method npo --lora-r 8 \\
        --lora-targets q_proj v_proj --out checkpoints/npo-lora
    accelerate launch analyses/unlearn.py ...      # several GPUs (DDP, or FSDP via `accelerate config`)

Data files are JSON/JSONL: strings, {"text": ...} or {"question": ..., "answer": ...} records. The output directory
holds the unlearned checkpoint (safetensors) or the LoRA adapter, its tokenizer and unlearn_run.json (settings and
loss curve). Each method's own settings (--beta, --retain-weight, --steering-coeff, ...) are listed below; unset,
they take the method's defaults (on the toy world: its toy settings).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from patchlab.cli import (add_model_args, add_quiet_arg, add_template_arg, device_arg, model_kwargs, parser,
                          print_written, prompt_template, run_script)
from patchlab.errors import PatchlabValueError
from patchlab.io import output_dir
from patchlab.unlearning.methods import add_settings_args, method_names, settings_from_args
from patchlab.unlearning.settings import REFERENCE_MODES, ReferenceSettings, add_training_args, training_from_args

LORA_FLAGS = {"lora_r": "r", "lora_alpha": "alpha", "lora_targets": "target_modules", "lora_dropout": "dropout"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, plugins=True)
    p.add_argument("--model", help="checkpoint to unlearn from: local directory or hub id (default: the toy world)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--forget", help="JSON/JSONL file of the forget set (required with --model)")
    p.add_argument("--retain", help="JSON/JSONL file of the retain set (needed by the methods that use one)")
    p.add_argument("--concept", help="toy-world concept to forget (default: the toy default)")
    p.add_argument("--method", default="graddiff", choices=method_names("finetune"), help="(default graddiff)")
    p.add_argument("--out", help="output directory (default results/unlearn/<method>), checked before training: "
                                 "refused when it holds files patchlab did not write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier patchlab checkpoint in --out "
                                                            "(files you added there are kept)")
    p.add_argument("--mask", help="safetensors file of bool tensors keyed by parameter name (True = may change)")
    add_template_arg(p)
    p.add_argument("--reference", choices=REFERENCE_MODES, default="precompute",
                   help="precompute the frozen reference's forget log-probabilities before training and drop it "
                        "(default), or hold it in memory")
    p.add_argument("--reference-device", type=device_arg,
                   help="device of a held reference, e.g. cpu (default: the training device)")
    add_training_args(p, "training (unset: TrainingSettings' default; on the toy world, where the method's toy "
                         "settings set one, theirs)", exclude=("template",))
    lora = p.add_argument_group("LoRA (train an adapter instead of the weights; needs peft)")
    lora.add_argument("--lora-r", type=int, help="adapter rank (giving any --lora-* flag turns LoRA on; default 8)")
    lora.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    lora.add_argument("--lora-targets", nargs="+", help="module names to adapt, e.g. q_proj v_proj "
                                                         "(default: peft's for the family)")
    lora.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0)")
    add_settings_args(p)
    add_model_args(p, device_help="e.g. cuda (default: cpu; under accelerate launch, each process's GPU)")
    add_quiet_arg(p)
    args = p.parse_args(argv)
    args.out = args.out or f"results/unlearn/{args.method}"
    return args


def _inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, forget, retain): from --model / --forget / --retain (read and checked before the model
    loads), or the toy world."""
    if args.model is not None:
        if args.forget is None:
            raise PatchlabValueError("--model needs --forget (a JSON/JSONL file of the forget set)")
        if args.concept is not None:
            raise PatchlabValueError("--concept selects a toy-world concept; it does not apply with --model")
        from patchlab.pair import load_model
        from patchlab.unlearning.data import read_data

        forget = read_data(args.forget, "forget")
        retain = read_data(args.retain, "retain") if args.retain is not None else None
        return load_model(args.model, **model_kwargs(args)), args.tokenizer or args.model, forget, retain
    if args.forget or args.retain or args.tokenizer:
        raise PatchlabValueError("--forget / --retain / --tokenizer need --model (the toy world brings its own)")
    from patchlab import toy
    from patchlab.pair import load_model
    from patchlab.toy.cache import unlearn_data

    forget, retain = unlearn_data(toy.world(), args.concept or toy.DEFAULT_CONCEPT)
    model, tok = toy.vanilla()
    return load_model(model, **model_kwargs(args)), tok, forget, retain


def unlearn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`patchlab.unlearning.unlearn` from the flags, over the method's toy settings on
    the toy world (no --model).

    Raises:
        PatchlabValueError: a method-settings flag the method does not take.
    """
    from patchlab.toy.cache import toy_method_settings

    defaults = toy_method_settings(args.method) if args.model is None else {}
    lora = {key: getattr(args, flag) for flag, key in LORA_FLAGS.items() if getattr(args, flag) is not None}
    return {**defaults, **training_from_args(args), **settings_from_args(args, args.method), "lora": lora or None,
            "reference": ReferenceSettings(mode=args.reference, device=args.reference_device),
            "template": prompt_template(args)}


def check_applicable(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """Refuse --retain and --reference-device where the method (with these settings, ``kwargs``) would ignore them:
    a method that uses no retain set, a run that holds no reference model.

    Raises:
        PatchlabValueError: naming the flag and why it does not apply.
    """
    from patchlab.unlearning.methods import get_method
    from patchlab.unlearning.trainer import split_settings

    _, settings = split_settings(args.method, kwargs)
    needs = get_method(args.method, kind="finetune").data_needs(settings)
    if args.retain is not None and not needs.retain:
        raise PatchlabValueError(f"--retain: {args.method} uses no retain set with these settings (it would be "
                                 "ignored); leave it out")
    held = needs.reference == "model" or (needs.reference != "none" and args.reference == "held")
    if args.reference_device is not None and not held:
        raise PatchlabValueError(f"--reference-device places a held reference model; {args.method} with --reference "
                                 f"{args.reference} holds none (it would be ignored)")


def unlearn_and_report(args: argparse.Namespace) -> None:
    """Run the unlearning the arguments describe, save it to --out and print the loss change."""
    from patchlab.pair import load_tokenizer
    from patchlab.unlearning import load_mask, unlearn

    kwargs = unlearn_kwargs(args)
    check_applicable(args, kwargs)
    out = output_dir(args.out, "checkpoint", overwrite=args.overwrite)
    mask = load_mask(args.mask) if args.mask else None
    model, tok, forget, retain = _inputs(args)
    if args.template == "chat":  # the tokenizer's chat template, once the tokenizer is known
        tok = load_tokenizer(tok)
        kwargs["template"] = prompt_template(args, tok)
    result = unlearn(model, forget, retain, tokenizer=tok, method=args.method, mask=mask, out_dir=out,
                     progress=not args.quiet, **kwargs)
    if not result.main_process:
        return
    print(f"{args.method}: {result.settings['n_forget']} forget / {result.settings['n_retain']} retain examples, "
          f"{len(result.losses)} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    print_written([result.out_dir])


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, unlearn_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
