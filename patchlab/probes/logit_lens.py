"""Logit lens (nostalgebraist 2020; read for unlearning by Patil et al., 2023): is the answer readable inside the
unlearned model even where its output no longer gives it?

Each decoder layer's output (the residual stream, site ``resid``) at the positions that predict the answer tokens
is decoded through the model's own final norm and unembedding (and its logit soft-capping, where the family has
one); for the last layer that is exactly the model's output. Per layer and question the lens reports the vanilla
answer tokens' mean log-probability (nats) and median rank (1 = top token), for the vanilla model, the unlearned
model and, when given, the retain model.

Headline: per question, the largest share, over its *informative* layers, of the vanilla model's lens
log-probability that the unlearned model's lens keeps at the same layer, ``clip((u_l - f_l) / (v_l - f_l), 0, 1)``;
averaged over the questions that have an informative layer. A layer is informative for a question when it is a
decoder layer before the last (0 to n - 2: the last one is the model's output) where the vanilla model's lens ranks
the answer tokens within the top ``top_k`` (median rank over the answer's tokens, default 10): elsewhere the lens
carries no information about the answer in the vanilla model either, and a share there would compare noise (a
log-probability of -16 at rank 1,000). The median, not the mean: one token the lens cannot read at an intermediate
layer, an instruct model's end-of-turn token (rank ~28,000 in SmolLM2) or a sentence's first word, must not hide a
layer that ranks the answer's words 1-3. The floor ``f_l`` is the retain model's lens at that layer (a model that never learned the answer) when one
is given, else the log-probability of a lens that knows nothing, uniform over the vocabulary, ``-log V``. (The
unlearned model's own output is no floor: the vanilla lens at an intermediate layer is almost always below it, which
forced every share to 0.)

Verdict: ``intact`` if the unlearned model keeps >= 50% of the vanilla target accuracy; ``inconclusive`` when no
question has an informative layer; else ``hidden`` if the headline is >= 0.5 (readable inside, not at the output),
else ``erased``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from transformers import PreTrainedModel

from patchlab.pair import ModelPair
from patchlab.pair.arch import ArchSpec
from patchlab.pair.qa import QA
from patchlab.patching.engine import capture
from patchlab.errors import PatchlabValueError
from patchlab.probes.base import INCONCLUSIVE, Interval, Probe, ProbeResult, recovery_verdict
from patchlab.probes.bootstrap import column_intervals, mean_interval
from patchlab.probes.scoring import Baselines, baseline

DEFAULTS: dict[str, Any] = {"top_k": 10}
NO_INFORMATIVE_LAYER = ("the vanilla model's lens ranks the answer within its top {k} at no decoder layer before the "
                        "last, for any question: the lens carries no information to compare")
MEASURES = ("logprob", "rank")


def decode(model: PreTrainedModel, spec: ArchSpec, hidden: Float[torch.Tensor, "position d_model"]
           ) -> Float[torch.Tensor, "position vocab"]:
    """Residual-stream states decoded as the model decodes its last one: final norm, unembedding, soft-capping."""
    norm = spec.norm(model)
    logits = model.get_output_embeddings()(norm(hidden) if norm is not None else hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def logit_lens(model: PreTrainedModel, spec: ArchSpec, prompt_ids: Sequence[Int[torch.Tensor, "prompt"]],
               answer_ids: Sequence[Int[torch.Tensor, "answer"]]) -> dict[str, Float[np.ndarray, "question layer"]]:
    """``{"logprob": [question, layer], "rank": [question, layer]}``: the answer tokens' mean log-probability
    (nats) and median rank (1 = top; the middle two averaged for an even count) under each layer's lens (module
    docstring), teacher-forced after the prompt."""
    sequences = [torch.cat([p, a]).long() for p, a in zip(prompt_ids, answer_ids)]
    scored = [torch.arange(len(p) - 1, len(p) - 1 + len(a)) for p, a in zip(prompt_ids, answer_ids)]
    cache, _, _ = capture(model, spec, sequences, [], scored, resid=True)
    starts = np.cumsum([0] + [len(s) for s in sequences[:-1]])
    n_layers = len(spec.layer_modules(model))
    out = {m: np.zeros((len(sequences), n_layers)) for m in MEASURES}
    for layer in range(n_layers):
        packed = cache[f"resid@{layer}"]
        for q, (start, positions, answer) in enumerate(zip(starts, scored, answer_ids)):
            logits = decode(model, spec, packed[int(start) + positions.to(packed.device)])
            out["logprob"][q, layer], out["rank"][q, layer] = read_answer(logits, answer)
    return out


def read_answer(logits: Float[torch.Tensor, "answer vocab"], answer: Int[torch.Tensor, "answer"]
                ) -> tuple[float, float]:
    """(mean log-probability in nats, median rank, 1 = top) of the ``answer`` tokens under one layer's lens
    ``logits`` (row i predicts token i); the median of an even count averages the middle two."""
    target = logits.gather(-1, answer.to(logits.device)[:, None])
    logprob = float((target[:, 0] - torch.logsumexp(logits, -1)).mean())
    return logprob, float((logits > target).sum(-1).float().add(1).quantile(0.5))


def readable_shares(unlearned: Float[np.ndarray, "question layer"], vanilla: Float[np.ndarray, "question layer"],
                    floor: Float[np.ndarray, "question layer"]) -> Float[np.ndarray, "question layer"]:
    """Per question and layer, ``clip((u - f) / (v - f), 0, 1)``: the share of the vanilla lens log-probability
    above the floor that the unlearned lens keeps (0 where the vanilla lens is not above the floor)."""
    gap = vanilla - floor
    return np.clip(np.divide(unlearned - floor, gap, out=np.zeros_like(gap), where=gap > 1e-9), 0.0, 1.0)


def informative_layers(vanilla_rank: Float[np.ndarray, "question layer"], top_k: int
                       ) -> Bool[np.ndarray, "question layer"]:
    """Per question and layer, whether the layer is informative (module docstring): a decoder layer before the last
    (any layer of a one-layer model) where the vanilla lens's median answer rank is at most ``top_k``."""
    informative = vanilla_rank <= top_k
    if informative.shape[1] > 1:
        informative[:, -1] = False
    return informative


def check(settings: Mapping[str, Any], pair: ModelPair) -> None:
    """The logit-lens probe's settings, before any compute (:data:`patchlab.probes.base.CheckFn`)."""
    k = settings["top_k"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PatchlabValueError(f"logit-lens top_k must be a positive integer (a rank), got {k!r}")


def layer_name(layer: int, n_layers: int) -> str:
    """A decoder layer named by its place: ``"layer 0 (the first decoder layer)"``, ``"layer 3 (intermediate)"``,
    ``"layer 5 (the last: the model's output)"``."""
    place = ("the first decoder layer" if layer == 0 else "the last: the model's output" if layer == n_layers - 1
             else "intermediate")
    return f"layer {layer} ({place})"


def run(pair: ModelPair, questions: list[QA], *, unrelated: list[QA] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool, baselines: Baselines
        ) -> ProbeResult:
    """The logit-lens probe (module docstring)."""
    check(settings, pair)
    refs, vanilla, unlearned = baselines.get(pair, questions, settings, progress)
    models = {"vanilla": pair.vanilla_hf, "unlearned": pair.unlearned_hf, **({"retain": retain} if retain else {})}
    lens = {who: logit_lens(m, pair.arch, refs.prompt_ids, refs.answer_ids) for who, m in models.items()}
    floor = lens["retain"]["logprob"] if retain is not None else \
        np.full_like(lens["vanilla"]["logprob"], -math.log(pair.vanilla_hf.get_output_embeddings().weight.shape[0]))
    informative = informative_layers(lens["vanilla"]["rank"], settings["top_k"])
    layer_shares = np.where(informative, readable_shares(lens["unlearned"]["logprob"], lens["vanilla"]["logprob"],
                                                         floor), np.nan)
    has = informative.any(axis=1)
    shares = np.where(has, np.where(informative, layer_shares, -np.inf).max(axis=1), np.nan)
    if has.any():
        headline = mean_interval(shares[has], settings)
        column_means = np.where(informative, layer_shares, 0.0).sum(axis=0) / np.maximum(informative.sum(axis=0), 1)
        best = int(np.where(informative.any(axis=0), column_means, -np.inf).argmax())
        note = f"most revealing informative layer on average: {layer_name(best, pair.n_layers)}; " \
               f"{int(has.sum())} of {len(has)} questions have an informative layer"
    else:
        headline, note = Interval(math.nan, math.nan, math.nan), "no informative layer"
    verdict, rule, reason = recovery_verdict(headline.value, vanilla.accuracy, unlearned.accuracy,
                                             "the lens of an informative layer before the last")
    if verdict == INCONCLUSIVE and not has.any():
        reason = NO_INFORMATIVE_LAYER.format(k=settings["top_k"])
    details = {**baseline(vanilla, unlearned), "floor": "retain" if retain is not None else "uniform (-log V)",
               "top_k": settings["top_k"], "informative": informative.tolist(),
               "shares": [None if math.isnan(x) else float(x) for x in shares],
               **{f"{who}_{m}": column_intervals(v[m], settings) for who, v in lens.items() for m in MEASURES},
               "per_question": {who: {m: v[m].tolist() for m in MEASURES} for who, v in lens.items()}}
    return ProbeResult(
        probe="logit_lens", score=headline, verdict=verdict, rule=rule, details=details,
        meaning="share of the vanilla model's answer log-probability under the logit lens that the unlearned "
                "model keeps at its most revealing informative decoder layer before the last (0 = none, 1 = all)",
        note=note, reason=reason)


PROBE = Probe(
    name="logit_lens", title="Logit lens", run=run, defaults=DEFAULTS, check=check,
    description="Each decoder layer's residual stream at the answer-predicting positions is decoded by the model's "
                "own final norm and unembedding (for the last layer, exactly the model's output), and the vanilla "
                "answer tokens' mean log-probability and rank are read off, for the vanilla (dotted), unlearned "
                "(solid) and retain (dashed) models. An answer readable in the unlearned model's middle layers but "
                "not at its output is hidden, not erased (Patil et al., 2023). The headline is the share of the "
                "vanilla lens log-probability, above a floor (the retain model's lens, else a uniform lens), that "
                "the unlearned model keeps at its most revealing informative layer: a decoder layer before the last "
                "where the vanilla lens ranks the answer in its top k. Bands are 95% bootstrap intervals over "
                "questions.")
