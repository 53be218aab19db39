"""Likelihood metrics of reference answers: TOFU's answer probability and truth ratio (Maini et al., 2024), as
open-unlearning computes them (``src/evals/metrics/memorization.py``: ``probability``, ``truth_ratio``;
``src/evals/metrics/utils.py``: ``evaluate_probability``).

Every answer is scored teacher-forced after the question's prompt (:func:`patchlab.unlearning.data.encode_example`:
the answer's tokens and the closing EOS are the targets, as in open-unlearning's ``preprocess_chat_instance``; the
prompt is patchlab's template, not a chat template). With ``NLL(a)`` the mean negative log-likelihood per target
token of answer ``a`` (nats):

* **probability** of the answer: ``P(a) = exp(−NLL(a))``, the length-normalised probability ``p(a|q)^(1/|a|)``
  (open-unlearning's ``prob``; TOFU's "Prob." on the forget / retain sets);
* **truth ratio** of a question with a paraphrased answer ``ã`` and perturbed (wrong) answers ``â_1..â_k``:

      ``R = exp(−mean_j NLL(â_j)) / (exp(−NLL(ã)) + 1e-10)``

  the geometric mean over the perturbed answers of ``P(â_j)`` divided by ``P(ã)`` (open-unlearning averages the
  per-answer mean losses, ``aggregate_to_1D``, before exponentiating). ``R < 1``: the model prefers the truth.

Per question set the raw ratios are reported as TOFU does: for the **forget** set (patchlab's *target* set)
``mean(min(R, 1/R))`` (open-unlearning's ``closer_to_1_better``: 1 when true and false answers are equally likely,
i.e. the knowledge is gone), for every other set (retain, real authors, world facts: patchlab's *unrelated* set)
``mean(max(0, 1 − R))`` (``true_better``: high when the model still prefers the truth). The probability is
averaged as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, check_fits, question_label
from patchlab.unlearning.data import Example, collate, encode_example
from patchlab.unlearning.losses import nll

#: The ``+1e-10`` open-unlearning adds to the true answer's probability in the truth ratio's denominator.
EPS = 1e-10


def closer_to_1_better(ratios: Sequence[float]) -> float:
    """``mean(min(R, 1/R))`` (open-unlearning adds 1e-10 to ``R`` in ``1/R``): the forget-set truth ratio, 0..1."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1 / (r + EPS))))


def true_better(ratios: Sequence[float]) -> float:
    """``mean(max(0, 1 − R))``: the truth ratio of sets whose knowledge should stay (retain...), 0..1."""
    return float(np.mean(np.maximum(0.0, 1 - np.asarray(ratios, dtype=np.float64))))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _field(item: Any, name: str) -> Any:
    """``item[name]`` of a record, or ``item.name`` of an object; ``None`` when absent (a plain question string
    has no field)."""
    if isinstance(item, str):
        return None
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PatchlabValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _texts(value: Any, what: str) -> list[str]:
    """A list of non-empty strings (one string is a list of one), as TOFU's ``perturbed_answer``."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, Sequence) or not values:
        raise PatchlabValueError(f"{what} must be a non-empty list of strings, got {value!r}")
    return [_text(v, what) for v in values]


@dataclass(frozen=True)
class LikelihoodMetric:
    """One likelihood metric: the answers it scores and how its per-question values are combined.

    Attributes:
        answers: ``answers(item, what) -> (groups of answers)``: the answer texts of one QA item, in groups whose
            NLLs :attr:`combine` receives (raises naming ``what`` when the item lacks a field).
        combine: ``combine(nlls per group) -> value`` for one question.
        aggregate: per set (``"target"``, ``"unrelated"``), how the per-question values become one number.
        fields: the record fields it needs, for messages.
    """

    answers: Callable[[Any, str], list[list[str]]]
    combine: Callable[[list[list[float]]], float]
    aggregate: Mapping[str, Callable[[Sequence[float]], float]]
    fields: tuple[str, ...]


def _answer(item: Any, what: str) -> list[list[str]]:
    return [[_text(_field(item, "answer"), f"{what}: 'answer'")]]


def _paraphrased_and_perturbed(item: Any, what: str) -> list[list[str]]:
    return [[_text(_field(item, "paraphrased_answer"), f"{what}: 'paraphrased_answer'")],
            _texts(_field(item, "perturbed_answer"), f"{what}: 'perturbed_answer'")]


def _probability(nlls: list[list[float]]) -> float:
    return math.exp(-nlls[0][0])


def _truth_ratio(nlls: list[list[float]]) -> float:
    (true,), false = nlls
    return math.exp(-float(np.mean(false))) / (math.exp(-true) + EPS)


#: The likelihood metrics :func:`patchlab.analysis.behavior.evaluate` can add (``likelihood=("prob", ...)``).
LIKELIHOOD_METRICS: dict[str, LikelihoodMetric] = {
    "prob": LikelihoodMetric(_answer, _probability, {"target": _mean, "unrelated": _mean}, ("answer",)),
    "truth_ratio": LikelihoodMetric(_paraphrased_and_perturbed, _truth_ratio,
                                    {"target": closer_to_1_better, "unrelated": true_better},
                                    ("paraphrased_answer", "perturbed_answer")),
}


def check_metrics(names: Sequence[str]) -> list[str]:
    """``names`` as a list, each a key of :data:`LIKELIHOOD_METRICS`; raises naming the known ones otherwise."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in LIKELIHOOD_METRICS]
    if unknown:
        raise PatchlabValueError(f"unknown likelihood metric {unknown[0]!r}; "
                                 f"choose from {', '.join(LIKELIHOOD_METRICS)}")
    return list(names)


@torch.no_grad()
def answer_nlls(model: PreTrainedModel, examples: Sequence[Example]) -> list[float]:
    """Mean NLL per target token (nats) of each example, one sequence per forward pass (never padded)."""
    return [float(nll(model, collate([example], pad_id=0))) for example in examples]


def encode_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
                   answers: Sequence[list[list[str]]], *, template: str = DEFAULT_TEMPLATE
                   ) -> list[list[list[Example]]]:
    """The teacher-forced examples of every answer of every question (``answers[i]``: groups of texts), each
    checked against the model's context (:func:`patchlab.pair.generation.check_fits`, naming the question)."""
    if tokenizer.eos_token_id is None:
        raise PatchlabValueError("the tokenizer has no eos token (the last target of every answer)")
    encoded = []
    for i, (question, groups) in enumerate(zip(questions, answers)):
        label = question_label(i, question)
        per_question = []
        for group in groups:
            examples = []
            for text in group:
                ex = encode_example(tokenizer, question, text, max_length=10**9, template=template)
                check_fits(model, ex.input_ids[:ex.prompt_len], len(ex.input_ids) - ex.prompt_len, label)
                examples.append(ex)
            per_question.append(examples)
        encoded.append(per_question)
    return encoded


#: The teacher-forced examples of a QA set, per metric: ``{metric: [per item: [per answer group: [Example]]]}``.
EncodedAnswers = dict[str, list[list[list[Example]]]]


def encode_qa(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[Any], metrics: Sequence[str],
              *, questions: Sequence[str] | None = None, template: str = DEFAULT_TEMPLATE, what: str = "QA"
              ) -> EncodedAnswers:
    """Validate and encode the answers that ``metrics`` score on ``qa``, without running the model.

    ``qa`` items are records or objects carrying ``question`` and each metric's fields (``answer``;
    ``paraphrased_answer`` and ``perturbed_answer``, a list, for the truth ratio: TOFU's ``*_perturbed`` splits).
    ``questions``: the items' questions, one per item, when the caller has them already (e.g.
    :func:`patchlab.analysis.behavior.questions_of`); default: read from each item (a string is its own question).

    Raises:
        PatchlabValueError: unknown metric, an item without a field a metric needs or an empty question (named by
            ``what`` and its index), ``questions`` not one per item, a question whose prompt plus answer exceeds the
            model's context.
    """
    if questions is None:
        questions = [item if isinstance(item, str) else _field(item, "question") for item in qa]
    elif len(questions) != len(qa):
        raise PatchlabValueError(f"{what}: {len(questions)} questions for {len(qa)} items")
    questions = [_text(question, f"{what} item {i}: 'question'") for i, question in enumerate(questions)]
    return {name: encode_answers(model, tokenizer, questions,
                                 [LIKELIHOOD_METRICS[name].answers(item, f"{what} item {i}")
                                  for i, item in enumerate(qa)], template=template)
            for name in check_metrics(metrics)}


def likelihood_values(model: PreTrainedModel, encoded: EncodedAnswers, *, progress: bool = False
                      ) -> dict[str, list[float]]:
    """Per-item values of each metric under ``model``: ``{metric: [value per item]}`` (from :func:`encode_qa`)."""
    return {name: [LIKELIHOOD_METRICS[name].combine([answer_nlls(model, group) for group in groups])
                   for groups in tqdm(per_item, desc=name, disable=not progress, leave=False)]
            for name, per_item in encoded.items()}


def aggregate(metric: str, set_name: str, values: Sequence[float]) -> float:
    """One number for ``values`` of ``metric`` on a question set, as TOFU reports it (see the module docstring).

    Raises:
        PatchlabValueError: unknown metric or set, no value.
    """
    table = LIKELIHOOD_METRICS[check_metrics([metric])[0]].aggregate
    if set_name not in table:
        raise PatchlabValueError(f"no {metric} aggregate for set {set_name!r}; sets: {', '.join(table)}")
    if len(values) == 0:
        raise PatchlabValueError(f"no {metric} value to aggregate on set {set_name!r}")
    return table[set_name](values)
