"""Unlearning Depth Score (Lee, Kim and Jo, 2026): how deep inside the model the knowledge was erased, measured
against a retain model that never saw it.

For each question the vanilla model's mean log-probability of the answer tokens is taken teacher-forced, ``p``.
Then, one decoder layer ``l`` at a time, the vanilla model's layer output (the residual stream, site ``resid``) at
the positions that predict the answer tokens is replaced by the retain model's (stage 1) or the unlearned model's
(stage 2), and the drops are ``d1_l = p - p_retain,l`` and ``d2_l = p - p_unlearned,l``. Layers with
``d1_l > threshold`` (0.05 nats) encode the knowledge; over them

    UDS = Σ_l d1_l · clip(d2_l / d1_l, 0, 1) / Σ_l d1_l

1 = the unlearned model's layers lack the knowledge as the retain model's do (erased as deeply); 0 = they carry it
as the vanilla model's do (intact inside, whatever the output says). A question without such a layer has no UDS and
is left out of the mean (the count is reported); when no question has one, the UDS is undefined and the verdict is
``inconclusive`` (nothing in the retain model's layers tells the knowledge apart).

Scored span (``span``): ``"generation"`` (default) scores the vanilla model's greedy answer, every token of it
(formatting tokens and what follows the answer included); ``"answer"`` scores only the tokens of the *given*
answer (each question's expected answer: give the entity, e.g. ``"Paris"``, to score the entity), teacher-forced
right after the prompt. ``"answer"`` is the reference's ``--reference gt --entity_source gt`` setting: the ground
truth's entity span, not the model's own wording; it needs every question to carry its answer.

Following the reference code (``compute_uds.py`` of gnueaj/unlearning-depth-score): the same two stages, the same
drop threshold, clipping and per-example weighting; the patched span is the evaluated span (their
``patch_scope="span"``), the patch replaces the decoder layer's output, and the score is the mean over examples with
a defined UDS. Differences: the prompt is patchlab's template (``"Question: {question}\\n Answer:"``); the scored
span is the vanilla greedy answer unless ``span="answer"`` (theirs: TOFU's answer continuation after a given
prefix, entity span only); every layer is patched, with the batched engine (:mod:`patchlab.patching.engine`).

The last layer: here a layer's patch replaces the decoder layer's true output (the residual stream before the
model's final norm), for every layer including the last. The reference patches Hugging Face's
``hidden_states[l]``, which for the last layer is the output *after* the final norm (transformers applies the norm
before returning the last hidden state), so its last-layer patch also swaps the norm's input statistics while ours
swaps the layer's output and lets the target's own final norm run. Layers 0 to L-2 agree with the reference to
float precision; the last layer differs by construction. Ours patches the same kind of site at every depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.pair.arch import ArchSpec
from patchlab.pair.qa import QA, check_answers
from patchlab.pair.sites import parse_component
from patchlab.patching.engine import PatchStore, Row, run_rows
from patchlab.patching.metrics import Metric, References, answer_logprob, get_metric
from patchlab.patching.sweep import position_mask, prepare_source, prepare_target
from patchlab.probes.base import INCONCLUSIVE, INTACT_SHARE, Interval, Probe, ProbeResult, output_verdict
from patchlab.probes.bootstrap import column_intervals, mean_interval
from patchlab.probes.scoring import Baselines, baseline

DEFAULTS: dict[str, Any] = {"threshold": 0.05, "batch_size": 64, "span": "generation"}
#: The scored spans (module docstring): the vanilla greedy answer, or the given answer's tokens only.
SPANS = ("generation", "answer")
RULE = (f"intact if the unlearned model keeps >= {INTACT_SHARE:.0%} of the vanilla target accuracy; else erased if "
        "UDS >= 0.5 (its layers lack the knowledge about as the retain model's do), else hidden; inconclusive when "
        "no question has a layer that encodes the answer (UDS undefined)")
UNDEFINED = ("no question has a layer whose retain-model patch drops the answer log-probability by more than the "
             "threshold: the UDS is undefined")


def answer_span_ids(tokenizer: PreTrainedTokenizerBase, questions: Sequence[QA]
                    ) -> list[Int[torch.Tensor, "answer"]]:
    """The given answers' token ids, encoded as the unlearning data encodes them (a space, then the answer, no
    special tokens), one 1-D tensor per question.

    Raises:
        PatchlabValueError: a question without a given answer (``span="answer"`` scores given answers only).
    """
    check_answers(questions, "UDS span='answer'", "give every question its answer (or its entity) or use "
                  "span='generation'")
    return [torch.tensor(tokenizer(" " + q.answer.strip(), add_special_tokens=False).input_ids, dtype=torch.long)
            for q in questions]


def with_source(store: PatchStore, source: PatchStore, source_logits: Sequence[Float[torch.Tensor, "answer vocab"]],
                metric: Metric, labels: Sequence[str]) -> PatchStore:
    """``store``, whose target pass :func:`prepare_target` ran, with the source activations of ``source`` (a
    :func:`prepare_source` store of the same prompts and answers) and that source's answer-predicting logits
    (float32, per question): the target's cached residual stream and logits are reused, the metric's references
    rebuilt and checked again (:meth:`Metric.check`)."""
    refs = [References(source=logits.to(r.target.device), target=r.target, answer_ids=r.answer_ids)
            for logits, r in zip(source_logits, store.refs)]
    return dataclasses.replace(store, source=source.source, refs=refs,
                               weights=[metric.check(r, label) for r, label in zip(refs, labels)])


def each_layer_patched(target: PreTrainedModel, store: PatchStore, metric: Metric, batch_size: int
                       ) -> Float[np.ndarray, "question layer"]:
    """The ``metric`` of ``target`` with one decoder layer's output at the answer-predicting positions taken from
    the store's source, per question and layer (float64)."""
    resid = parse_component("resid", store.spec.sites)
    n_layers = len(store.spec.layer_modules(target))
    rows = [Row(q, resid, (layer, layer + 1), position_mask("scored", store.prompt_lens[q], len(store.ids[q])))
            for q in range(len(store.ids)) for layer in range(n_layers)]
    return run_rows(target, store, rows, metric, batch_size=batch_size).reshape(len(store.ids), n_layers) \
        .double().numpy()


@torch.no_grad()
def patched_logprobs(target: PreTrainedModel, sources: Sequence[PreTrainedModel], spec: ArchSpec,
                     prompt_ids: Sequence[Int[torch.Tensor, "prompt"]], answer_ids: Sequence[Int[torch.Tensor, "answer"]],
                     *, batch_size: int = 64
                     ) -> tuple[Float[np.ndarray, "question"], list[Float[np.ndarray, "question layer"]]]:
    """The target model's mean answer log-probability (nats) per question, and, per model of ``sources``, the same
    with one decoder layer's output at the answer-predicting positions taken from that model, for every layer
    (``[question, layer]`` each). The target's own forward pass runs once, for all sources."""
    labels = [f"question {q}" for q in range(len(prompt_ids))]
    metric = get_metric("answer_logprob")
    first, *others = sources
    store, source_logits = prepare_source(first, spec, prompt_ids, answer_ids, sites=[spec.site("resid")],
                                          labels=labels)
    prepare_target(target, store, source_logits, answer_ids, metric=metric, labels=labels)
    patched = [each_layer_patched(target, store, metric, batch_size)]
    for source in others:
        store = with_source(store, *prepare_source(source, spec, prompt_ids, answer_ids, sites=[spec.site("resid")],
                                                   labels=labels), metric, labels)
        patched.append(each_layer_patched(target, store, metric, batch_size))
    own = np.array([float(answer_logprob(r.target, r.answer_ids)) for r in store.refs])
    return own, patched


def depth_scores(d1: Float[np.ndarray, "question layer"], d2: Float[np.ndarray, "question layer"], threshold: float
                 ) -> Float[np.ndarray, "question"]:
    """Per question ``Σ d1·clip(d2/d1, 0, 1) / Σ d1`` over the layers with ``d1 > threshold`` (NaN without one)."""
    knows = d1 > threshold
    ratio = np.clip(np.divide(d2, d1, out=np.zeros_like(d1), where=knows), 0.0, 1.0)
    weight = np.where(knows, d1, 0.0).sum(axis=1)
    return np.divide((np.where(knows, d1, 0.0) * ratio).sum(axis=1), weight, out=np.full(len(d1), np.nan),
                     where=weight > 0)


def unlearning_depth(pair: ModelPair, retain: PreTrainedModel, prompt_ids: Sequence[torch.Tensor],
                     answer_ids: Sequence[torch.Tensor], *, threshold: float = 0.05, batch_size: int = 64
                     ) -> dict[str, Any]:
    """The Unlearning Depth Score of ``pair`` (module docstring) on the given prompts and vanilla answers.

    Returns:
        ``{"uds": [question] (NaN where no layer encodes the answer), "d1", "d2": [question, layer] drops (nats),
        "full": [question] vanilla answer log-probability}`` as numpy arrays.

    Raises:
        PatchlabValueError: ``threshold`` is not positive, or the retain model is not of the pair's family and size.
    """
    if not threshold > 0:
        raise PatchlabValueError(f"the UDS threshold must be > 0 nats, got {threshold!r}")
    from patchlab.pair.loading import check_compatible

    check_compatible(pair.vanilla_hf, retain)
    full, (via_retain, via_unlearned) = patched_logprobs(pair.vanilla_hf, [retain, pair.unlearned_hf], pair.arch,
                                                         prompt_ids, answer_ids, batch_size=batch_size)
    d1, d2 = full[:, None] - via_retain, full[:, None] - via_unlearned
    return {"uds": depth_scores(d1, d2, threshold), "d1": d1, "d2": d2, "full": full}


def run(pair: ModelPair, questions: list[QA], *, unrelated: list[QA] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool, baselines: Baselines
        ) -> ProbeResult:
    """The UDS probe (module docstring)."""
    if retain is None:
        raise PatchlabValueError("the UDS probe needs a retain model (retain=...)")
    refs, vanilla, unlearned = baselines.get(pair, questions, settings, progress)
    scored = refs.answer_ids if settings["span"] == "generation" else answer_span_ids(pair.tokenizer, questions)
    depth = unlearning_depth(pair, retain, refs.prompt_ids, scored, threshold=settings["threshold"],
                             batch_size=settings["batch_size"])
    defined = ~np.isnan(depth["uds"])
    headline = mean_interval(depth["uds"][defined], settings) if defined.any() else Interval(math.nan, math.nan,
                                                                                              math.nan)
    verdict, reason = output_verdict(vanilla.accuracy, unlearned.accuracy) or \
        ((INCONCLUSIVE, UNDEFINED) if not defined.any() else ("erased" if headline.value >= 0.5 else "hidden", ""))
    details = {**baseline(vanilla, unlearned), "threshold": settings["threshold"], "span": settings["span"],
               "uds": [None if math.isnan(u) else float(u) for u in depth["uds"]],
               "full": depth["full"].tolist(), "d1": depth["d1"].tolist(), "d2": depth["d2"].tolist(),
               "d1_mean": column_intervals(depth["d1"], settings), "d2_mean": column_intervals(depth["d2"], settings)}
    return ProbeResult(
        probe="uds", score=headline, verdict=verdict, rule=RULE, details=details, reason=reason,
        meaning="Unlearning Depth Score: how much of what the retain model's layers lack the unlearned model's "
                "layers lack too (1 = erased as deeply as never learned, 0 = still inside)",
        note=f"{int(defined.sum())} of {len(defined)} questions have a layer that encodes the answer")


def check(settings: Mapping[str, Any], pair: ModelPair) -> None:
    """The UDS probe's settings, before any compute (:data:`patchlab.probes.base.CheckFn`)."""
    if not isinstance(settings["threshold"], (int, float)) or not settings["threshold"] > 0:
        raise PatchlabValueError(f"the UDS threshold must be > 0 nats, got {settings['threshold']!r}")
    if not isinstance(settings["batch_size"], int) or settings["batch_size"] < 1:
        raise PatchlabValueError(f"UDS batch_size must be a positive integer, got {settings['batch_size']!r}")
    if settings["span"] not in SPANS:
        raise PatchlabValueError(f"UDS span must be one of {SPANS}, got {settings['span']!r}")


PROBE = Probe(
    name="uds", title="Unlearning Depth Score", run=run, defaults=DEFAULTS, needs=("retain",),
    check=check,
    description="One decoder layer at a time, the vanilla model's layer output over the answer-predicting positions "
                "is replaced by the retain model's (dotted: how much that layer carries the knowledge, d1) or by the "
                "unlearned model's (solid, d2). Over the layers where d1 > 0.05 nats, UDS = Σ d1·clip(d2/d1, 0, 1) "
                "/ Σ d1 (Lee, Kim and Jo, 2026): 1 = the unlearned layers lack the knowledge as the retain model's "
                "do, 0 = they still carry it. Bands are 95% bootstrap intervals over questions.")
