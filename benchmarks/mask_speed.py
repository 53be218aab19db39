"""Time to a weight mask on a random LLaMA: scoring and selection for each attribution method, in one run.

For each method (``random``, ``magnitude``, ``wagle``) it times :func:`patchlab.unlearning.attribution.scores` and
:func:`patchlab.unlearning.attribution.mask` (global and per layer) and prints, besides the seconds, the selection
time in units of one read of every score (``abs().max()`` over all tensors, timed in the same run): the exact radix
select makes four passes over the scores, so about 4-8 is the expected range; a much larger number means a slow
path. WAGLE scores come from a few random word sequences (their cost is the backward passes, not the selection).

    python benchmarks/mask_speed.py                                   # 1b shape cut to 4 layers: 0.33B weights
    python benchmarks/mask_speed.py --shape toy
    python benchmarks/mask_speed.py --n-layers 16 --ratio 0.2
"""

from __future__ import annotations

import argparse
import random
import time

from patchlab.cli import parser, run
from patchlab.defaults import SHAPES
from patchlab.errors import PatchlabValueError

METHODS = ("random", "magnitude", "wagle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shape", choices=SHAPES, default="1b", help="model shape preset (default 1b)")
    p.add_argument("--n-layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of weights selected (default 0.5)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per WAGLE forget/retain sequence (default 32)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    return p.parse_args(argv)


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads < 1 or args.n_layers < 1 or args.seq_len < 2:
        raise PatchlabValueError("--threads and --n-layers must be >= 1, --seq-len >= 2")
    import torch
    from transformers import AutoModelForCausalLM

    from patchlab.tiny import shape_config, word_tokenizer
    from patchlab.unlearning.attribution import mask, scores

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = shape_config(args.shape, max_positions=args.seq_len + 8, n_layers=args.n_layers)
    model = AutoModelForCausalLM.from_config(config)
    n_weights = sum(p.numel() for p in model.parameters())
    words = [f"w{i}" for i in range(config.vocab_size - 4)]
    tok = word_tokenizer([" ".join(words)])
    rng = random.Random(0)
    forget, retain = ([" ".join(rng.choices(words, k=args.seq_len)) for _ in range(4)] for _ in range(2))
    print(f"{args.shape} shape, {args.n_layers} layers: {n_weights / 1e9:.2f}B weights, ratio {args.ratio}, "
          f"{args.threads} threads")
    print(f"{'method':<10} {'scores s':>9} {'mask s':>8} {'per-layer s':>12} {'mask / one read':>16}")
    for method in METHODS:
        data = {"forget": forget, "retain": retain, "tokenizer": tok} if method == "wagle" else {}
        s, t_scores = timed(scores, model, method=method, progress=False, **data)
        _, t_read = timed(lambda: [t.abs().max() for t in s.values()])
        _, t_mask = timed(mask, s, args.ratio)
        _, t_layer = timed(mask, s, args.ratio, per_layer=True)
        print(f"{method:<10} {t_scores:>9.2f} {t_mask:>8.2f} {t_layer:>12.2f} {t_mask / t_read:>16.1f}")
        del s
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
