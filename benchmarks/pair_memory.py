"""Peak memory of a KRS sweep with the pair held whole vs one model at a time (``load_pair(..., sequential=True)``),
measured in one run, on the toy world and on a larger random LLaMA pair saved as checkpoints.

Every run is a fresh subprocess that loads the pair from its checkpoint directories and sweeps 4 questions (the
four paper components, window 5); its peak is ``torch.cuda.max_memory_allocated`` on CUDA, else the peak resident set
resident set size of the process (``VmHWM``, which counts the memory-mapped checkpoint files transformers loads the
weights from, and Python and the libraries: the ``imports only`` row measures that baseline, and the last column
subtracts it). The two modes must give the same KRS (printed: the largest
difference).

    python benchmarks/pair_memory.py                                              # toy + 1b shape with 4 layers, CPU
    python benchmarks/pair_memory.py --shape 1b --n-layers 16 --device cuda --dtype bfloat16
    python benchmarks/pair_memory.py --estimate 70b --dtype bfloat16        # sizes only, nothing loaded

``--estimate SHAPE`` measures the shape's parameter bytes per decoder layer on the meta device (no memory used)
and prints what a whole pair and a one-model-at-a-time pair need, and how many GPUs of ``--gpu-gib`` that takes.
The activation overhead of a 10-question sweep is scaled from the one measured on an H100 with the 7B shape
(26.20 GiB peak for 25.10 GiB of weights: 1.10 GiB) by layers x (d_mlp + 2 d_model), the size of what the sweep
caches per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import patchlab
from patchlab.cli import DTYPES, device_arg, parser, run
from patchlab.tiny import SHAPES, noisy_pair, numbered_tokenizer, random_questions, shape_config
from patchlab.toy.corpus import ASSETS

GIB = 2 ** 30
MODES = ("imports only", "whole", "sequential")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="the random pair's shape (default 1b)")
    p.add_argument("--n-layers", type=int, default=4, help="its decoder layers (default 4)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--estimate", choices=sorted(SHAPES), help="print the memory a pair of this shape needs and stop")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU for --estimate (default 80)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def save_random_pair(root: Path, shape: str, n_layers: int, dtype: torch.dtype) -> list[str]:
    """A random LLaMA and a noisy copy saved under ``root`` (with a numbered tokenizer); returns 4 questions."""
    config = shape_config(shape, n_layers=n_layers)
    tok = numbered_tokenizer(config.vocab_size)
    for name, model in zip(("vanilla", "unlearned"), noisy_pair(config, dtype=dtype)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return random_questions(config.vocab_size, 4)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the pair of ``spec`` in its mode and sweep; returns the peak bytes and the KRS table."""
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    scores = None
    if spec["mode"] != "imports only":
        pair = patchlab.load_pair(spec["vanilla"], spec["unlearned"], dtype=getattr(torch, spec["dtype"]),
                                  device=spec["device"], sequential=spec["mode"] == "sequential")
        result = patchlab.krs_sweep(pair, spec["questions"], window=min(5, pair.n_layers), n_tokens=10,
                                    progress=False)
        scores = {c: v.tolist() for c, v in result.per_question.items()}
    return {"peak": torch.cuda.max_memory_allocated() if cuda else peak_rss(), "scores": scores}


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``: it counts the memory-mapped weights transformers
    loads checkpoints into, and unlike ``ru_maxrss`` starts afresh at ``exec``, so a child does not inherit the
    peak of the process that launched it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise patchlab.PatchlabValueError("this system has no /proc/self/status VmHWM: measure on Linux or CUDA")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh subprocess."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise patchlab.PatchlabValueError(f"run {spec['mode']} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def report(args: argparse.Namespace) -> None:
    """Measure both modes on the toy world and on the random pair, print one table."""
    toy_unlearned = tempfile.TemporaryDirectory()
    random_root = tempfile.TemporaryDirectory()
    from patchlab import toy

    world = toy.pair(progress=False)
    world.pair.unlearned_hf.save_pretrained(toy_unlearned.name)
    world.pair.tokenizer.save_pretrained(toy_unlearned.name)
    cases = {"toy world": (str(ASSETS), toy_unlearned.name, world.questions[:4]),
             f"random {args.shape}, {args.n_layers} layers": (
                 str(Path(random_root.name) / "vanilla"), str(Path(random_root.name) / "unlearned"),
                 save_random_pair(Path(random_root.name), args.shape, args.n_layers, getattr(torch, args.dtype)))}
    measured = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"peak memory of a 4-question KRS sweep ({measured}), {args.dtype} on {args.device}")
    print(f"{'pair':<26} {'mode':<13} {'peak GiB':>9} {'above imports GiB':>18} {'max |KRS diff|':>15}")
    for name, (vanilla, unlearned, questions) in cases.items():
        results = {mode: run_one({"mode": mode, "vanilla": vanilla, "unlearned": unlearned, "questions": questions,
                                  "device": args.device, "dtype": args.dtype}) for mode in MODES}
        base = results["imports only"]["peak"]
        gap = max(float(np.abs(np.array(results["whole"]["scores"][c]) - np.array(results["sequential"]["scores"][c]))
                        .max()) for c in results["whole"]["scores"])
        for mode, r in results.items():
            diff = f"{gap:15.1e}" if mode == "sequential" else ""
            print(f"{name:<26} {mode:<13} {r['peak'] / GIB:9.3f} {(r['peak'] - base) / GIB:18.3f} {diff}")
        whole, sequential = (results[m]["peak"] - base for m in ("whole", "sequential"))
        print(f"{name:<26} sequential / whole, above imports: {sequential / whole:.2f}" if whole > 0 else
              f"{name:<26} too small to measure")


#: Measured on one H100 (benchmarks/krs_speed.py --shape 7b, bfloat16): sweep peak minus the pair's weights, GiB.
MEASURED_OVERHEAD_7B_GIB = 26.20 - 2 * 12.55


def estimate(shape: str, dtype: torch.dtype, gpu_gib: float) -> None:
    """Print the memory of a pair of ``shape`` (module docstring) from its meta-device parameter sizes."""
    from accelerate import init_empty_weights

    config = shape_config(shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * size / GIB
    total = sum(p.numel() for p in model.parameters()) * size / GIB
    scale = lambda c: c.num_hidden_layers * (c.intermediate_size + 2 * c.hidden_size)  # noqa: E731
    overhead = MEASURED_OVERHEAD_7B_GIB * scale(config) / scale(shape_config("7b"))
    print(f"{shape}: {config.num_hidden_layers} layers x {layer:.2f} GiB + {total - layer * config.num_hidden_layers:.2f} "
          f"GiB embeddings and head = {total:.1f} GiB per model in {dtype}; sweep overhead about {overhead:.1f} GiB")
    for mode, need in (("whole pair", 2 * total + overhead), ("one model at a time", total + overhead)):
        gpus = int(np.ceil(need / (0.9 * gpu_gib)))
        print(f"  {mode:<20} {need:7.1f} GiB -> {gpus} x {gpu_gib:.0f} GiB GPUs (90% of each usable)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.estimate:
        return run(lambda: estimate(args.estimate, getattr(torch, args.dtype), args.gpu_gib))
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
