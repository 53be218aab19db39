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
    python benchmarks/pair_memory.py --questions 10,100,400 --memory-budget 32MiB  # peak as the questions grow

``--estimate SHAPE`` measures the shape's parameter bytes per decoder layer on the meta device (no memory used)
and prints what a whole pair and a one-model-at-a-time pair need, and how many GPUs of ``--gpu-gib`` that takes.
The sweep's overhead is counted, for ``--n-questions`` questions of ``--prompt-tokens`` + ``--n-tokens`` tokens
and the shape's vocabulary: the cache of the questions prepared together (as many as ``--memory-budget`` holds,
:func:`patchlab.patching.engine.question_cache_bytes` of the four paper components), the restored float32 logits of
one pass (``--batch-size`` rows, at most a quarter of the budget) and one decoder layer's activations of a pass
(``rows x tokens x (3 d_mlp + 6 d_model)`` in the dtype: MLP gate, up and product; residual, norm, attention
input, output and queries, keys and values).

``--questions N1,N2,...`` sweeps a random pair of ``--shape`` (all its layers unless ``--n-layers``) built in a
fresh process for each run, with the memory budget and without (``memory_budget=None``), on N1, N2, ... questions
(random answers of ``--n-tokens`` given), and prints each run's peak above the memory in use before the sweep
(CUDA: ``max_memory_allocated``; CPU: the peak resident set size, reset after the warm-up through
``/proc/self/clear_refs``, with glibc's mmap threshold fixed so that freed tensors leave the resident set), the
number of question chunks and the largest difference between the two runs' KRS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import patchlab
from patchlab.cli import DTYPES, comma_list, device_arg, parser, run
from patchlab.defaults import DEFAULT_COMPONENTS, DEFAULT_MEMORY_BUDGET, SHAPES

if TYPE_CHECKING:
    import torch

GIB = 2 ** 30
MODES = ("imports only", "whole", "sequential")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="the random pair's shape (default 1b)")
    p.add_argument("--n-layers", type=int, help="its decoder layers (default 4; with --questions all the shape's)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--estimate", choices=sorted(SHAPES), help="print the memory a pair of this shape needs and stop")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU for --estimate (default 80)")
    p.add_argument("--n-questions", type=int, default=10, help="--estimate: questions swept (default 10)")
    p.add_argument("--prompt-tokens", type=int, default=36, help="--estimate: prompt tokens per question (default 36)")
    p.add_argument("--n-tokens", type=int, default=30, help="answer tokens per question (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="restorations per pass (default 64)")
    p.add_argument("--memory-budget", default=DEFAULT_MEMORY_BUDGET,
                   help=f"the sweep's memory_budget, e.g. 512MiB, or 'none' (default {DEFAULT_MEMORY_BUDGET})")
    p.add_argument("--questions", type=_counts, help="sweep a random pair on these numbers of questions, e.g. 10,400")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in comma_list(text) or []]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return counts


def budget_arg(text: str) -> int | None:
    """``--memory-budget`` in bytes (``none``: unbounded)."""
    from patchlab.patching.sweep import memory_bytes

    return None if text.lower() == "none" else memory_bytes(text)


def save_random_pair(root: Path, shape: str, n_layers: int, dtype: torch.dtype) -> list[str]:
    """A random LLaMA and a noisy copy saved under ``root`` (with a numbered tokenizer); returns 4 questions."""
    from patchlab.tiny import noisy_pair, numbered_tokenizer, random_questions, shape_config

    config = shape_config(shape, n_layers=n_layers)
    tok = numbered_tokenizer(config.vocab_size)
    for name, model in zip(("vanilla", "unlearned"), noisy_pair(config, dtype=dtype)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return random_questions(config.vocab_size, 4)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the pair of ``spec`` in its mode and sweep; returns the peak bytes and the KRS table."""
    # every mode imports the libraries it loads and sweeps with first, so "imports only" is the others' baseline
    import torch

    import patchlab.pair
    import patchlab.patching.sweep  # noqa: F401

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
    return {"peak": torch.cuda.max_memory_allocated() if cuda else rss(), "scores": scores}


def run_one(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement in a fresh subprocess (``env``: variables added to its environment)."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False, env={**os.environ, **(env or {})})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise patchlab.PatchlabValueError(f"run {spec['mode']} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def report(args: argparse.Namespace) -> None:
    """Measure both modes on the toy world and on the random pair, print one table."""
    import numpy as np
    import torch

    from patchlab import toy
    from patchlab.toy.corpus import ASSETS

    toy_unlearned = tempfile.TemporaryDirectory()
    random_root = tempfile.TemporaryDirectory()

    world = toy.pair(progress=False)
    world.pair.unlearned_hf.save_pretrained(toy_unlearned.name)
    world.pair.tokenizer.save_pretrained(toy_unlearned.name)
    cases = {"toy world": (str(ASSETS), toy_unlearned.name, world.questions[:4]),
             f"random {args.shape}, {args.n_layers or 4} layers": (
                 str(Path(random_root.name) / "vanilla"), str(Path(random_root.name) / "unlearned"),
                 save_random_pair(Path(random_root.name), args.shape, args.n_layers or 4, getattr(torch, args.dtype)))}
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


def estimate(shape: str, dtype: torch.dtype, gpu_gib: float, *, questions: int, prompt_tokens: int, n_tokens: int,
             batch_size: int, budget: int | None) -> None:
    """Print the memory of a pair of ``shape`` and of its sweep (module docstring), from meta-device sizes."""
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from patchlab.patching.engine import question_cache_bytes
    from patchlab.patching.sweep import plan_chunks
    from patchlab.tiny import shape_config

    config = shape_config(shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * size / GIB
    total = sum(p.numel() for p in model.parameters()) * size / GIB
    spec = patchlab.arch_spec(model)
    sites = [s for s in spec.sites if s.cached is not None and any(s.name in c.split("+") for c in DEFAULT_COMPONENTS)]
    seq = prompt_tokens + n_tokens
    per_question = question_cache_bytes(model, spec, sites, seq, n_tokens, dtype)
    held = max(len(c) for c in plan_chunks([per_question] * questions, budget))
    logits = batch_size * n_tokens * config.vocab_size * 4
    logits = logits if budget is None else min(logits, max(budget // 4, n_tokens * config.vocab_size * 4))
    activations = batch_size * seq * (3 * config.intermediate_size + 6 * config.hidden_size) * size
    overhead = (held * per_question + logits + activations) / GIB
    print(f"{shape}: {config.num_hidden_layers} layers x {layer:.2f} GiB + {total - layer * config.num_hidden_layers:.2f} "
          f"GiB embeddings and head = {total:.1f} GiB per model in {dtype}")
    print(f"  sweep of {questions} questions x ({prompt_tokens} + {n_tokens}) tokens, vocabulary {config.vocab_size}: "
          f"cache {per_question / 2 ** 20:.1f} MiB per question, {held} held at once "
          f"({'unbounded' if budget is None else f'budget {budget / GIB:.2f} GiB'}) = {held * per_question / GIB:.2f} "
          f"GiB; logits of a pass {logits / GIB:.2f} GiB; layer activations of a pass {activations / GIB:.2f} GiB; "
          f"overhead {overhead:.1f} GiB")
    for mode, need in (("whole pair", 2 * total + overhead), ("one model at a time", total + overhead)):
        gpus = int(np.ceil(need / (0.9 * gpu_gib)))
        print(f"  {mode:<20} {need:7.1f} GiB -> {gpus} x {gpu_gib:.0f} GiB GPUs (90% of each usable)")


def reset_peak(cuda: bool) -> int:
    """Start a new peak (CUDA's allocator statistics, or ``VmHWM`` through ``/proc/self/clear_refs``); returns the
    memory in use now (allocated bytes, or the resident set size)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


def rss(field: str = "VmHWM") -> int:
    """A memory field of ``/proc/self/status`` in bytes (default ``VmHWM``, the peak resident set size: it counts
    the memory-mapped weights transformers loads checkpoints into, and unlike ``ru_maxrss`` starts afresh at
    ``exec``, so a child does not inherit the peak of the process that launched it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise patchlab.PatchlabValueError(f"this system has no /proc/self/status {field}: measure on Linux or CUDA")


#: glibc's allocator with a fixed mmap threshold: tensors above 128 KiB are returned to the system when freed, so the
#: resident set size follows the memory in use (with the default dynamic threshold, freed chunks of a few MiB stay
#: in the heap and the peak RSS creeps up with each question chunk).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def sweep_questions(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build the random pair of ``spec``, sweep ``spec["n"]`` questions (random answers given)
    within ``spec["budget"]``; returns the peak above the memory in use before the sweep, the number of question
    chunks and the KRS per question."""
    import torch

    from patchlab.pair.generation import encode_prompts, format_prompts
    from patchlab.patching.sweep import _cached_sites, question_chunks, resolve_components
    from patchlab.tiny import noisy_pair, numbered_tokenizer, random_questions, shape_config

    cuda = spec["device"].startswith("cuda")
    config = shape_config(spec["shape"], n_layers=spec["n_layers"])
    vocab = config.vocab_size
    pair = patchlab.load_pair(*noisy_pair(config, dtype=getattr(torch, spec["dtype"]), device=spec["device"]),
                              tokenizer=numbered_tokenizer(vocab))
    budget = budget_arg(spec["budget"])
    kw = dict(n_tokens=spec["n_tokens"], batch_size=spec["batch_size"], window=min(5, pair.n_layers), progress=False)
    patchlab.krs_sweep(pair, random_questions(vocab, 2), **kw)  # warm-up (kernels, allocator)
    questions = random_questions(vocab, spec["n"])
    generator = torch.Generator().manual_seed(spec["n"])  # the same answers in both runs of n questions
    answers = [torch.randint(4, vocab, (spec["n_tokens"],), generator=generator) for _ in questions]
    prompts = [len(ids) for ids in encode_prompts(pair.tokenizer, format_prompts(questions))]
    sites = _cached_sites(pair, resolve_components(pair, DEFAULT_COMPONENTS))
    chunks = len(question_chunks(pair, sites, prompts, [spec["n_tokens"]] * spec["n"], budget))
    start = reset_peak(cuda)
    result = patchlab.krs_sweep(pair, questions, answers=answers, memory_budget=budget, **kw)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss()) - start
    return {"peak": peak, "chunks": chunks, "scores": {c: v.tolist() for c, v in result.per_question.items()}}


def by_questions(args: argparse.Namespace) -> None:
    """Sweep a random pair on growing numbers of questions with the budget and without, each run in a fresh
    process; print the peaks and the largest KRS difference between the two runs of each number."""
    import numpy as np

    from patchlab.tiny import shape_config

    config = shape_config(args.shape, n_layers=args.n_layers)
    measured = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"KRS sweep of a random {args.shape} pair ({config.num_hidden_layers} layers, vocabulary "
          f"{config.vocab_size}), {args.dtype} on {args.device}, {args.n_tokens} random answer tokens, batch "
          f"{args.batch_size}: {measured} above the memory in use before the sweep (a fresh process each)")
    print(f"{'questions':>9} {'memory_budget':>13} {'chunks':>6} {'peak GiB':>9} {'max |KRS diff|':>15}", flush=True)
    scores: dict[int, dict[str, list[float]]] = {}
    for label in (args.memory_budget, "none"):
        for n in args.questions:
            r = run_one({"kind": "questions", "shape": args.shape, "n_layers": args.n_layers, "dtype": args.dtype,
                         "device": args.device, "n": n, "budget": label, "n_tokens": args.n_tokens,
                         "batch_size": args.batch_size, "mode": f"{n} questions, budget {label}"}, env=FIXED_MMAP)
            gap = "" if n not in scores else \
                f"{max(float(np.abs(np.subtract(r['scores'][c], scores[n][c])).max()) for c in scores[n]):15.1e}"
            scores.setdefault(n, r["scores"])
            print(f"{n:9d} {label:>13} {r['chunks']:6d} {r['peak'] / GIB:9.3f} {gap}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.estimate:
        import torch

        return run(lambda: estimate(args.estimate, getattr(torch, args.dtype), args.gpu_gib,
                                    questions=args.n_questions, prompt_tokens=args.prompt_tokens,
                                    n_tokens=args.n_tokens, batch_size=args.batch_size,
                                    budget=budget_arg(args.memory_budget)))
    if args.questions:
        return run(lambda: by_questions(args))
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(sweep_questions(spec) if spec.get("kind") == "questions" else measure(spec)))
        return 0
    return run(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
