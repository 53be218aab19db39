"""Quantization attack (Zhang et al., 2024): round the unlearned weights to a few bits and re-score the answers.

Every linear weight (``torch.nn.Linear``, and GPT-2's ``Conv1D``; embeddings and norms stay as they are) is rounded
to ``bits`` bits, per output channel, symmetric, round-to-nearest: with ``q = 2^(bits-1) - 1`` and, per output row
``w``, ``s = max|w| / q``, the weight becomes ``s * clamp(round(w / s), -q, q)`` (plain torch, any device; float32
arithmetic, stored back in the weight's dtype; a tied output layer rounds the embedding with it). Small unlearning
updates fall inside one rounding step, so the rounded unlearned model can land on the rounded vanilla one: Zhang et
al. report the retained knowledge rising from 21% to 83% at 4 bits.

For each width in ``bits`` (e.g. 8 and 4) the quantized unlearned model is scored like the original
(:mod:`patchlab.probes.scoring`); recovery ``(quantized - unlearned) / (vanilla - unlearned)`` of accuracy and answer
log-probability, with bootstrap intervals. The quantized vanilla model is scored too, as a reference for what the
rounding itself costs. At 16 bits the rounding error is below float32 noise for the audit's scores.

Headline: the accuracy recovery at the smallest width. Verdict (:func:`patchlab.probes.base.recovery_verdict`):
``intact`` if the unlearned model keeps >= 50% of the vanilla target accuracy, else ``hidden`` if the recovery is
>= 50%, else ``erased``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from patchlab.probes.base import Probe, ProbeResult, Question, recovery_verdict
from patchlab.probes.bootstrap import mean_interval
from patchlab.probes.scoring import SCORES, Scores, baseline, baseline_scores, recovery, score
from patchlab.errors import PatchlabValueError
from patchlab.pair import ModelPair

DEFAULTS: dict[str, Any] = {"bits": [8, 4]}
MAX_BITS = 16


def quantize_weight(weight: Float[torch.Tensor, "out in"], bits: int) -> Float[torch.Tensor, "out in"]:
    """Symmetric round-to-nearest of each row (output channel) of ``weight`` to ``bits`` bits (module docstring);
    float32 arithmetic, returned in ``weight``'s dtype. An all-zero row stays zero."""
    if not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise PatchlabValueError(f"bits must be an integer in 2..{MAX_BITS}, got {bits!r}")
    levels = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((w / scale).round().clamp(-levels, levels) * scale).to(weight.dtype)


@torch.no_grad()
def quantize_(model: PreTrainedModel, bits: int) -> PreTrainedModel:
    """Round every linear weight of ``model`` in place (:func:`quantize_weight`); returns the model. ``Conv1D``
    stores its weight as ``[in, out]``, so its output channels are columns."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(quantize_weight(module.weight, bits))
        elif isinstance(module, Conv1D):
            module.weight.copy_(quantize_weight(module.weight.T, bits).T)
    return model


def check_bits(settings: Mapping[str, Any]) -> list[int]:
    """The validated bit widths (distinct, each in 2..16), widest first."""
    bits = list(settings["bits"])
    if not bits or len(set(bits)) != len(bits) or any(not isinstance(b, int) or not 2 <= b <= MAX_BITS for b in bits):
        raise PatchlabValueError(f"quantization bits must be distinct integers in 2..{MAX_BITS}, got "
                                 f"{settings['bits']!r}")
    return sorted(bits, reverse=True)


def levels(scores: Sequence[Scores], settings: Mapping[str, Any]) -> dict[str, list]:
    """Question means of accuracy and answer log-probability per model variant, ``[value, low, high]`` each."""
    return {name: [mean_interval(s.get(name), settings).to_list() for s in scores] for name in SCORES}


def run(pair: ModelPair, questions: list[Question], *, unrelated: list[Question] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool) -> ProbeResult:
    """The quantization probe (module docstring)."""
    widths = check_bits(settings)
    tok = pair.tokenizer
    refs, vanilla, unlearned = baseline_scores(pair, questions, settings, progress)
    rounded: dict[str, list[Scores]] = {"unlearned": [], "vanilla": []}
    for bits in tqdm(widths, desc="quantization", disable=not progress, leave=False):
        for role, model in (("unlearned", pair.unlearned_hf), ("vanilla", pair.vanilla_hf)):
            rounded[role].append(score(quantize_(copy.deepcopy(model), bits), tok, refs, settings))
    points = [recovery(s, unlearned, vanilla, settings) for s in rounded["unlearned"]]
    details = {"bits": widths, **baseline(vanilla, unlearned),
               "levels": {"unlearned": levels([unlearned, *rounded["unlearned"]], settings),
                          "vanilla": levels([vanilla, *rounded["vanilla"]], settings)},
               **{f"recovery_{name}": [p[name].to_list() for p in points] for name in SCORES},
               "per_question": {role: [s.to_dict() for s in scores] for role, scores in rounded.items()}}
    headline = points[-1]["accuracy"]
    verdict, rule = recovery_verdict(headline.value, vanilla.accuracy, unlearned.accuracy,
                                     f"rounding to {widths[-1]} bits")
    return ProbeResult(
        probe="quantization", score=headline, verdict=verdict, rule=rule, details=details,
        meaning=f"share of the lost target accuracy back after rounding the unlearned weights to {widths[-1]} bits "
                "(0 = none, 1 = all)",
        note=f"rounded vanilla accuracy {rounded['vanilla'][-1].accuracy:.2f}")


PROBE = Probe(
    name="quantization", title="Quantization attack", run=run, defaults=DEFAULTS,
    check=lambda settings, pair: check_bits(settings),
    description="Every linear weight of the unlearned model is rounded per output channel (symmetric, "
                "round-to-nearest) to a few bits, and the target answers are re-scored. Unlearning updates smaller "
                "than one rounding step vanish, so the rounded unlearned model can land on the rounded vanilla one "
                "(Zhang et al., 2024: retained knowledge from 21% to 83% at 4 bits). Solid: the unlearned model, "
                "dotted: the vanilla model, each at full precision and rounded; bands and bars are 95% bootstrap "
                "intervals over questions. The headline recovery = (rounded - unlearned) / (vanilla - unlearned) "
                "of the target accuracy.")
