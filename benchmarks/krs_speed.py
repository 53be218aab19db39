"""KRS sweep speed, measured in one run: loop vs batched engine, the batched engine vs plain forward passes over the
same layer work, the plan's work ratio and (on CUDA) host synchronisations inside the layer loop.

A random LLaMA pair (the unlearned copy is the vanilla one plus 5% Gaussian noise), 10 questions of 12 random words,
30 greedy answer tokens, the four paper components over centred windows of 5 layers. Shapes:

    python benchmarks/krs_speed.py                                # toy world's shape (the CPU target)
    python benchmarks/krs_speed.py --shape 1b --device cuda --dtype bfloat16
    python benchmarks/krs_speed.py --shape 7b --device cuda --dtype bfloat16 --no-loop

Printed ratios (each from numbers measured in this run):

* work ratio: decoder-layer token positions the batched plan runs / the least any plan could run (each
  restoration from its first restored layer up, its own length); hardware independent, target <= 1.1;
* time ratio: the batched patching passes / the same forward passes without restorations (same rows, start
  layers, padding and scored positions); target <= 1.3 on a GPU;
* loop / batched: the plain one-restoration-per-pass engine against the batched one; target >= 8x on the CPU default;
* host syncs (CUDA): synchronising calls counted by torch.cuda.set_sync_debug_mode in the decoder-layer loops of
  the patched passes (from the first layer's call to the LM head's); target 0. Hugging Face's mask preparation
  before the loop synchronises once per pass (its packed-sequence check on position ids); that one is outside.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import patchlab
from patchlab.cli import DTYPES, device_arg, parser, run
from patchlab.defaults import DEFAULT_COMPONENTS, SHAPES

if TYPE_CHECKING:
    import torch


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (CUDA synchronised before and after)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@contextlib.contextmanager
def layer_loop_sync_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Inside the block, ``torch.cuda.set_sync_debug_mode(mode)`` is on from the first decoder layer's call to the
    LM head's, i.e. in the decoder-layer loop of every forward pass (HF's mask preparation before it excluded)."""
    import torch

    spec = patchlab.arch_spec(model)
    on = spec.layer_modules(model)[0].register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode(mode))
    off = model.get_output_embeddings().register_forward_pre_hook(
        lambda *_: torch.cuda.set_sync_debug_mode("default"))
    try:
        yield
    finally:
        on.remove()
        off.remove()
        torch.cuda.set_sync_debug_mode("default")


def count_syncs(model: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """The number of synchronising CUDA calls in the decoder-layer loops of ``model`` while ``fn()`` runs."""
    with warnings.catch_warnings(record=True) as caught, layer_loop_sync_mode(model, "warn"):
        warnings.simplefilter("always")
        fn()
    return sum("synchronizing" in str(w.message) for w in caught)


def first_sync(model: torch.nn.Module, fn: Callable[[], Any]) -> str:
    """Where ``fn()`` first synchronises inside a decoder-layer loop of ``model``: the innermost frames of the error
    ``torch.cuda.set_sync_debug_mode("error")`` raises ("" when it never does)."""
    try:
        with layer_loop_sync_mode(model, "error"):
            fn()
    except RuntimeError:
        return "".join(traceback.format_exc().splitlines(keepends=True)[-14:])
    return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--n-tokens", type=int, default=30)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--no-loop", action="store_true", help="skip the loop engine (slow on big shapes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: measure(args))


def measure(args: argparse.Namespace) -> None:
    """Build the pair, run every timing, print the table (module docstring)."""
    import numpy as np
    import torch

    from patchlab.pair.sites import parse_component
    from patchlab.patching.engine import Row, layer_work, plan_batches, run_rows
    from patchlab.patching.metrics import get_metric
    from patchlab.patching.sweep import _cached_sites, position_mask, prepare, reference_answers
    from patchlab.tiny import noisy_pair, numbered_tokenizer, random_questions, shape_config

    shape, dtype, device = SHAPES[args.shape], getattr(torch, args.dtype), args.device
    pair = patchlab.load_pair(*noisy_pair(shape_config(args.shape), dtype=dtype, device=device),
                              tokenizer=numbered_tokenizer(shape["vocab"]))
    questions = random_questions(shape["vocab"], args.questions)
    kw = dict(window=args.window, n_tokens=args.n_tokens, batch_size=args.batch_size, progress=False)

    patchlab.krs_sweep(pair, questions[:2], **kw)  # warm-up (kernels, allocator)
    (prompts, answers), generation = timed(lambda: reference_answers(pair, questions, n_tokens=args.n_tokens), device)
    result, sweep = timed(lambda: patchlab.krs_sweep(pair, questions, answers=answers, **kw), device)

    # the same sweep's pieces, timed apart: caching both models, the patched passes, the plain passes
    comps = [parse_component(c) for c in DEFAULT_COMPONENTS]
    metric = get_metric("krs")
    store, caching = timed(lambda: prepare(pair, prompts, answers, sites=_cached_sites(pair, comps), metric=metric,
                                           labels=questions), device)
    windows = patchlab.sliding_windows(pair.n_layers, args.window)
    rows = [Row(q, c, w, position_mask("all", store.prompt_lens[q], len(store.ids[q])))
            for q in range(len(questions)) for c in comps for w in windows]
    lengths = [len(ids) for ids in store.ids]
    plan = plan_batches(rows, lengths, pair.n_layers, args.batch_size, mix_layers=not device.startswith("cpu"))
    executed, minimum = layer_work(rows, plan, lengths, pair.n_layers)
    per_question = [[i for i, r in enumerate(rows) if r.question == q] for q in range(len(questions))]
    old_executed, _ = layer_work(rows, per_question, lengths, pair.n_layers)
    run = lambda restore: run_rows(pair.unlearned_hf, store, rows, metric, batch_size=args.batch_size,  # noqa: E731
                                   restore=restore)
    run(True)
    _, patched = timed(lambda: run(True), device)
    _, plain = timed(lambda: run(False), device)
    syncs = count_syncs(pair.unlearned_hf, lambda: run(True)) if device.startswith("cuda") else None

    print(f"model: {args.shape} ({shape['n_layers']} layers, d_model {shape['d_model']}, d_mlp {shape['d_mlp']}, "
          f"vocab {shape['vocab']}), "
          f"{args.dtype} on {device}; {len(questions)} questions x ~{np.mean([len(a) for a in answers]):.1f} answer "
          f"tokens (~{np.mean(lengths):.1f} tokens per sequence); {len(rows)} restorations in {len(plan)} passes")
    print(f"reference answers (vanilla greedy generation):       {generation:8.3f} s")
    print(f"batched sweep, end to end (answers given):           {sweep:8.3f} s")
    print(f"  caching both models:                               {caching:8.3f} s")
    print(f"  patched passes:                                    {patched:8.3f} s")
    print(f"  the same passes, no restoration (plain forwards):  {plain:8.3f} s")
    print(f"work ratio (executed / minimum layer-token work):    {executed / minimum:8.3f}  (one pass per question "
          f"from layer 0, the previous plan: {old_executed / minimum:.3f})")
    print(f"time ratio (patched / plain passes):                 {patched / plain:8.3f}")
    if syncs is not None:
        print(f"host syncs in the layer loops of the patched passes: {syncs:8d}")
        if syncs:
            print("first synchronising call in a layer loop:\n" +
                  first_sync(pair.unlearned_hf, lambda: run_rows(pair.unlearned_hf, store, rows[:1], metric)))
    if not args.no_loop:
        loop, loop_time = timed(lambda: patchlab.krs_sweep(pair, questions, answers=answers, engine="loop", **kw),
                                device)
        gap = max(float(np.abs(loop.per_question[c] - result.per_question[c]).max()) for c in result.components)
        print(f"loop engine sweep:                                   {loop_time:8.3f} s")
        print(f"loop / batched:                                      {loop_time / sweep:8.2f}x   "
              f"(max |KRS difference| {gap:.1e})")


if __name__ == "__main__":
    sys.exit(main())
