"""Peak memory of unlearning with each fine-tuning method on a random LLaMA of a given shape, with the frozen
reference held and precomputed, in one run.

Every run (method x reference mode) is a fresh subprocess that builds the random model, runs a few optimizer steps
of :func:`patchlab.unlearning.unlearn` on random word sequences and reports its peak: on CUDA
``torch.cuda.max_memory_allocated`` (weights, gradients, AdamW states, activations, the reference), on the CPU the
peak resident set size of the process (``ru_maxrss``, which also counts the Python, torch and transformers
libraries: the ``weights only`` row measures that baseline plus the weights, and the last column subtracts it).
Methods without a reference get one row; NPO, DPO, NPO+KL and RMU get ``held`` and ``precompute`` rows (NPO+KL
and RMU keep the model in both).

    python benchmarks/unlearn_memory.py                                    # toy shape, CPU, float32
    python benchmarks/unlearn_memory.py --shape 1b --n-layers 2 --seq-len 64  # 0.25B parameters, CPU
    python benchmarks/unlearn_memory.py --device cuda --dtype bfloat16 --shape 7b --batch-size 4
    python benchmarks/unlearn_memory.py --shape 1b --n-layers 8 --methods npo,simnpo --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import time
from typing import Any

from patchlab.cli import DTYPES, comma_list, device_arg, parser, run
from patchlab.defaults import SHAPES
from patchlab.errors import PatchlabValueError
from patchlab.unlearning.methods import get_method, method_names
from patchlab.unlearning.settings import REFERENCE_MODES

WEIGHTS_ONLY = "weights only"
GIB = 2 ** 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shape", choices=SHAPES, default="toy", help="model shape preset (default toy)")
    for name in SHAPES["toy"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="forget (and retain) sequences per step (default 4)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default 2)")
    p.add_argument("--methods", default=",".join(method_names("finetune")),
                   help="comma-separated fine-tuning methods (default: all)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shape(args: argparse.Namespace) -> dict[str, int]:
    """The preset ``--shape`` with the flags that override it."""
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPES[args.shape].items()}


def config(size: dict[str, int], seq_len: int):
    """The LLaMA config of a shape (``size``: :data:`patchlab.defaults.SHAPES` keys) for sequences of ``seq_len``."""
    from patchlab.tiny import shape_config

    return shape_config("toy", max_positions=seq_len + 8, **size)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(method, reference mode) of every run, after the weights-only baseline; ``-`` where no reference is used."""
    runs = [(WEIGHTS_ONLY, "-")]
    for method in comma_list(args.methods):
        entry = get_method(method, kind="finetune")
        uses_reference = entry.data_needs(entry.make_settings()).reference != "none"
        runs += [(method, mode) for mode in REFERENCE_MODES] if uses_reference else [(method, "-")]
    return runs


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the random model and unlearn for ``spec["steps"]`` steps; returns peak and weight bytes, seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    from patchlab.tiny import word_tokenizer
    from patchlab.unlearning import unlearn

    cuda = spec["device"].startswith("cuda")
    size = spec["shape"]
    torch.manual_seed(0)
    model_config = config(size, spec["seq_len"])
    words = [f"w{i}" for i in range(size["vocab"] - 4)]
    tok = word_tokenizer([" ".join(words)])
    rng = random.Random(0)
    n = spec["batch_size"] * spec["steps"]
    forget, retain = ([" ".join(rng.choices(words, k=spec["seq_len"])) for _ in range(n)] for _ in range(2))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, spec["dtype"]))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    steps = 0
    if spec["method"] != WEIGHTS_ONLY:
        mode = spec["reference"] if spec["reference"] != "-" else "precompute"
        result = unlearn(model, forget, retain, tokenizer=tok, method=spec["method"], lr=1e-5, epochs=1,
                         batch_size=spec["batch_size"], max_length=spec["seq_len"] + 1, reference=mode,
                         gradient_checkpointing=spec["gradient_checkpointing"], progress=False)
        steps = len(result.losses)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"peak": peak, "weights": weights, "params": sum(p.numel() for p in model.parameters()),
            "steps": steps, "seconds": round(time.perf_counter() - start, 1)}


def child(spec_json: str) -> None:
    """One run in this process; prints its result as one JSON line (``{"oom": true}`` on CUDA out-of-memory)."""
    import torch

    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        result = {"oom": True}
    print(json.dumps(result))


def run_one(args: argparse.Namespace, method: str, reference: str) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess; returns its JSON result, or ``{"error": last stderr line}``."""
    spec = {"method": method, "reference": reference, "shape": shape(args), "seq_len": args.seq_len,
            "batch_size": args.batch_size, "steps": args.steps, "device": args.device, "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def report(args: argparse.Namespace) -> None:
    """Run every measurement of :func:`plan` and print the table."""
    for name in ("seq_len", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise PatchlabValueError(f"--{name.replace('_', '-')} must be >= 1")
    from tqdm.auto import tqdm

    runs = plan(args)
    results = [run_one(args, m, r) for m, r in tqdm(runs, desc="memory runs")]
    base = results[0]
    if "error" in base or "oom" in base:
        raise PatchlabValueError(f"the model does not fit: {base.get('error', 'out of memory')}")
    size = shape(args)
    measured = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS of the process"
    print(f"unlearning peak memory ({measured}): random LLaMA, {size['n_layers']} layers, d_model {size['d_model']}, "
          f"d_mlp {size['d_mlp']}, {size['n_heads']}/{size['n_kv_heads']} heads, vocab {size['vocab']} "
          f"({base['params'] / 1e9:.3f}B parameters, {base['weights'] / GIB:.2f} GiB of {args.dtype} weights); "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, {args.device}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"{'method':<13} {'reference':<11} {'peak GiB':>9} {'x weights':>10} {'above weights-only GiB':>23} "
          f"{'seconds':>8}")
    for (method, reference), r in zip(runs, results):
        if "peak" in r:
            print(f"{method:<13} {reference:<11} {r['peak'] / GIB:>9.3f} {r['peak'] / base['weights']:>10.2f} "
                  f"{(r['peak'] - base['peak']) / GIB:>23.3f} {r['seconds']:>8.1f}")
        else:
            print(f"{method:<13} {reference:<11} {'OOM' if r.get('oom') else 'error':>9}  {r.get('error', '')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
