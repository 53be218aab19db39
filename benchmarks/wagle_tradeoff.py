"""WAGLE sign-convention check on the toy world: does unlearning only the WAGLE-selected weights give a better
forget/retain trade-off than a random or magnitude mask of the same ratio?

The default concept is unlearned with the toy world's settings for ``--method`` (``patchlab.toy.METHOD_SETTINGS``),
once per mask, each time from a fresh copy of the vanilla model. Masks, all at ``--ratio``:

* ``none`` - every weight may change (the toy world's own unlearned model);
* ``random``, ``magnitude`` - the baselines of :func:`patchlab.unlearning.attribution.scores`;
* ``wagle|S|`` - WAGLE ranked by ``|S|`` (the authors' selection; identical for both ``ℓ_f`` conventions);
* ``wagle ascent``, ``wagle nll`` - WAGLE ranked by the signed ``S`` with ``ℓ_f = −NLL(forget)`` (the paper's
  reading, the gradient-ascent objective) or ``ℓ_f = +NLL(forget)``.

For each it prints forget-QA and unrelated-QA accuracy (greedy answers, 0..1), forget and retain NLL (nats per
target token) and writes them to ``--out`` (JSON). A good mask keeps unrelated-QA accuracy and retain NLL near
the vanilla model's while forget-QA accuracy drops::

    python benchmarks/wagle_tradeoff.py --ratio 0.5

``--preset authors`` scores and masks as the WAGLE authors' code does (``attribution.PRESETS["authors"]``: summed
gradients over batches of one sequence, the plain NLL, γ = their ``mu`` = 1e-6 unless ``--gamma``, the top
``int(n · ratio)`` weights by ``|S|``); the random and magnitude masks then also select ``int(n · ratio)`` weights,
and the signed-``S`` rows, which the authors do not use, are left out. Unlearning itself is the same in both
presets (patchlab's trainer clips no gradient, so masking before or after clipping is the same there).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import patchlab
from patchlab.cli import add_quiet_arg, parser, print_written, quiet, run
from patchlab.io import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from patchlab.unlearning.attribution import Mask
    from patchlab.unlearning.data import Example


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--checkpoint", help="toy-world checkpoint directory (default: the shipped one)")
    p.add_argument("--concept", help="concept to unlearn (default: the toy default)")
    p.add_argument("--method", help="unlearning method, a toy METHOD_SETTINGS key (default: the toy default)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of weights each mask selects")
    p.add_argument("--preset", default="patchlab",
                   help="how WAGLE scores and masks are computed: patchlab (default) or authors (as in the WAGLE "
                        "authors' code)")
    p.add_argument("--gamma", type=float, help="WAGLE's Hessian-diagonal parameter (default: the preset's, 1.0 for "
                                               "patchlab, the authors' mu = 1e-6 for authors)")
    p.add_argument("--epochs", type=int, help="override the method's epochs (same for every mask)")
    p.add_argument("--lr", type=float, help="override the method's learning rate (same for every mask)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask and of unlearning")
    p.add_argument("--out", default="results/wagle_tradeoff.json", help="JSON file for the numbers")
    add_quiet_arg(p)
    return p.parse_args(argv)


def with_toy_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the toy world's checkpoint, concept and method where unset, its preset checked.

    Raises:
        PatchlabValueError: an unknown preset (naming the known ones).
    """
    from patchlab import toy
    from patchlab.toy.build import ASSETS
    from patchlab.unlearning import attribution

    if args.preset not in attribution.PRESETS:
        raise patchlab.PatchlabValueError(f"--preset {args.preset!r} is unknown; choose from "
                                          f"{', '.join(attribution.PRESETS)}")
    return argparse.Namespace(**{**vars(args), "checkpoint": args.checkpoint or str(ASSETS),
                                 "concept": args.concept or toy.DEFAULT_CONCEPT,
                                 "method": args.method or toy.DEFAULT_METHOD})


def mean_nll(model: PreTrainedModel, examples: list[Example], batch_size: int = 32) -> float:
    """NLL per target token (nats) over ``examples``: ``-log p`` summed over every target token, divided by
    their count (tokens pooled across batches).

    Raises:
        PatchlabValueError: no example.
    """
    import torch

    from patchlab.unlearning import batches
    from patchlab.unlearning.losses import token_logprobs

    if not examples:
        raise patchlab.PatchlabValueError("mean_nll needs at least one example")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size):
            logp, targets = token_logprobs(model, batch)
            total -= logp.sum().item()
            count += int(targets.sum())
    return total / count


def evaluate(model: PreTrainedModel, tok, record, forget_ex: list[Example], retain_ex: list[Example]) -> dict:
    from patchlab import toy

    return {"forget_qa": toy.qa_accuracy(model, tok, record.qa),
            "unrelated_qa": toy.qa_accuracy(model, tok, record.unrelated_qa),
            "forget_nll": mean_nll(model, forget_ex), "retain_nll": mean_nll(model, retain_ex)}


def build_masks(model: PreTrainedModel, tok, forget: list[Example], retain: list[Example], ratio: float,
                gamma: float, seed: int, preset: str = "patchlab", progress: bool = True
                ) -> dict[str, Mask | None]:
    """The masks compared, by name (``None``: no mask); the signed-``S`` rows only under the patchlab preset."""
    from patchlab.unlearning import attribution

    common = {"tokenizer": tok, "progress": progress}
    baseline = {"random": attribution.scores(model, method="random", seed=seed, **common),
                "magnitude": attribution.scores(model, method="magnitude", **common)}
    masks = {"none": None, **{name: attribution.mask(s, ratio, preset=preset) for name, s in baseline.items()}}
    if preset == "authors":
        wagle = attribution.scores(model, forget, retain, method="wagle", preset=preset, gamma=gamma, **common)
        return {**masks, "wagle|S|": attribution.mask(wagle, ratio, preset=preset)}
    ascent = attribution.scores(model, forget, retain, method="wagle", gamma=gamma, forget_loss="ascent", **common)
    # forget_loss="nll" only flips the sign of the forget gradient, so its scores are exactly -ascent
    # (tests/test_attribution.py checks the equality bit for bit): no second pair of gradient passes
    nll_s = {name: -s for name, s in ascent.items()}
    return {**masks, "wagle|S|": attribution.mask(ascent, ratio),
            "wagle ascent": attribution.mask(ascent, ratio, by="value"),
            "wagle nll": attribution.mask(nll_s, ratio, by="value")}


def compare(args: argparse.Namespace) -> None:
    """Unlearn once per mask, evaluate each run, write --out and print the comparison."""
    from tqdm.auto import tqdm

    from patchlab import toy
    from patchlab.toy.cache import toy_method_settings, unlearn_data
    from patchlab.unlearning import attribution, to_examples, unlearn

    args = with_toy_defaults(args)
    vanilla, tok = toy.vanilla(args.checkpoint)
    world = toy.world(args.checkpoint)
    record = world.record(args.concept)
    forget, retain = unlearn_data(world, args.concept)
    settings = toy_method_settings(args.method)
    settings.update({k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None})
    forget_ex, retain_ex = to_examples(forget, tok), to_examples(retain, tok)
    results = {"vanilla": evaluate(vanilla, tok, record, forget_ex, retain_ex)}
    gamma = args.gamma if args.gamma is not None else attribution.PRESETS[args.preset].gamma
    masks = build_masks(vanilla, tok, forget_ex, retain_ex, args.ratio, gamma, args.seed, args.preset,
                        progress=not args.quiet)
    runs = tqdm(masks.items(), desc="masks", unit="mask", disable=args.quiet)
    for name, m in runs:
        runs.set_postfix_str(name)
        start = time.perf_counter()
        unlearned = unlearn(copy.deepcopy(vanilla), forget, retain, tokenizer=tok, method=args.method, mask=m,
                            mask_after_clipping=args.preset == "authors", seed=args.seed, progress=not args.quiet,
                            **settings).model
        results[name] = evaluate(unlearned, tok, record, forget_ex, retain_ex)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        runs.write(f"{name:>13}: " + "  ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    overlaps = {f"{a} vs {b}": attribution.overlap(masks[a], masks[b])
                for a, b in [("wagle|S|", "random"), ("wagle|S|", "magnitude"), ("wagle ascent", "wagle nll")]
                if a in masks and b in masks}
    atomic_write_json(args.out, {"settings": {**vars(args), "gamma": gamma, "unlearn": settings}, "results": results,
                                 "mask_overlap_jaccard": overlaps})
    print(f"\n{args.method} {settings} on {args.concept!r}, ratio {args.ratio}, preset {args.preset}, gamma {gamma:g}")
    print(f"{'mask':>13} {'forget QA':>10} {'unrel. QA':>10} {'forget NLL':>11} {'retain NLL':>11}")
    for name, r in results.items():
        print(f"{name:>13} {r['forget_qa']:>10.2f} {r['unrelated_qa']:>10.2f} {r['forget_nll']:>11.3f} "
              f"{r['retain_nll']:>11.3f}")
    for pair, value in overlaps.items():
        print(f"mask overlap (Jaccard) {pair}: {value:.3f}")
    print_written([Path(args.out)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with quiet(args.quiet):
        return run(lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
