"""Behavioural tests of unlearning (Hong et al., section 4 and Fig. 2).

The vanilla and the unlearned model each answer every question greedily (``patchlab.pair.generation``: ids kept,
one prompt at a time, no padding). Each after-answer is scored against the before-answer of the same question
(:mod:`patchlab.analysis.text_metrics`):

* **BLEU**: sacrebleu's ``sentence_bleu`` (13a tokenisation, exponential smoothing, effective order), on the
  text decoded from the generated ids with special tokens skipped, on sacrebleu's 0-100 scale;
* **ROUGE-L**: the LCS-based F1 (:func:`patchlab.analysis.text_metrics.rouge_l`) on the generated token ids
  themselves (special tokens dropped), on a 0-1 scale, so it needs no re-tokenisation.

100 BLEU / 1 ROUGE-L means the answer did not change. A good unlearning method drives the *target* scores down
and keeps the *unrelated* scores up. On QA records that carry reference answers, :func:`evaluate` also scores TOFU's
likelihood metrics under both models (``likelihood=("prob", "truth_ratio")``, :mod:`patchlab.analysis.likelihood`):
the probability of the answer, and the truth ratio of paraphrased vs perturbed answers.
:func:`patchlab.analysis.method_sweep.method_sweep` runs every unlearning method at several strengths and plots
target BLEU against unrelated BLEU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from pydantic import ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.analysis.likelihood import LIKELIHOOD_METRICS, aggregate, encode_qa, likelihood_values
from patchlab.analysis.text_metrics import rouge_l, sentence_bleu
from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, greedy_answers
from patchlab.pair import ModelPair
from patchlab.pair.sequential import SequentialPair
from patchlab.provenance import pair_provenance
from patchlab.results import Result, register_result, results_record
from patchlab.schema import FreeJson, Provenance, Schema, Unit, bad

SETS = ("target", "unrelated")
METRICS = ("bleu", "rouge_l")



def _question(item: Any) -> str:
    """The question of a string, a ``{"question": ...}`` record or an object with a ``.question`` attribute."""
    question = item.get("question") if isinstance(item, Mapping) else getattr(item, "question", item)
    if not isinstance(question, str):
        raise PatchlabValueError(f"a QA item must be a question string, a record with 'question' or an object with "
                                 f".question, got {item!r}")
    return question


def questions_of(qa: Sequence[Any], what: str) -> list[str]:
    """Questions of a QA set (see :func:`_question`); raises naming the set when it is empty."""
    if isinstance(qa, str) or len(qa) == 0:
        raise PatchlabValueError(f"the {what} QA set must be a non-empty list of questions")
    return [_question(item) for item in qa]


def _content_ids(ids: Int[torch.Tensor, "answer"], special: set[int]) -> list[int]:
    return [t for t in ids.tolist() if t not in special]


Bleu = Annotated[float, Field(ge=0, le=100)]


class BehaviorRow(Schema):
    """One question's row of a behavioural test's file; any other column (a likelihood metric's
    ``{metric}_before`` / ``{metric}_after``) is a finite number."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float]

    set: Literal[SETS]
    question: str
    before: str
    after: str
    bleu: Bleu
    rouge_l: Unit
    same: bool


def _same_columns(rows: Sequence[BehaviorRow], path: str, required: Sequence[str] = ()) -> None:
    """Every row of ``rows`` (the field ``path``) has the first row's columns, ``required`` among them."""
    first = list(rows[0].model_extra)
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row.model_extra]
        if missing:
            raise bad(f"{path}[{i}]", "no {columns} column (its likelihood metrics)", columns=", ".join(missing))
        if list(row.model_extra) != first:
            raise bad(f"{path}[{i}]", "columns {columns} differ from the first row's {first}",
                      columns=list(row.model_extra), first=first)


class BehaviorResultFile(Schema):
    """A :class:`BehaviorResult` file: a finished test's rows, each with the columns of its likelihood metrics."""

    format: Literal["patchlab.BehaviorResult/1"]
    partial: Literal[False]
    settings: dict[str, FreeJson]
    provenance: Provenance
    likelihood: list[Literal[tuple(LIKELIHOOD_METRICS)]]
    averages: dict[Literal[SETS], dict[str, float]]
    rows: Annotated[list[BehaviorRow], Field(min_length=1)]

    @model_validator(mode="after")
    def _columns(self) -> BehaviorResultFile:
        if len(set(self.likelihood)) != len(self.likelihood):
            raise bad("likelihood", "a metric is listed twice: {metrics}", metrics=self.likelihood)
        _same_columns(self.rows, "rows", [f"{m}_{side}" for m in self.likelihood for side in ("before", "after")])
        return self


@register_result
@dataclass
class BehaviorResult(Result):
    """Per-question before/after answers and scores.

    Attributes:
        table: one row per question: ``set`` (target / unrelated), ``question``, ``before`` and ``after`` (decoded
            answers), ``bleu`` (0-100), ``rouge_l`` (0-1), ``same`` (the answer ids are identical); with likelihood
            metrics, ``{metric}_before`` / ``{metric}_after`` per metric (the vanilla / unlearned model's value,
            e.g. ``prob_after``, ``truth_ratio_before``: the raw ratio ``R``). Also :meth:`to_frame`.
        likelihood: the likelihood metrics scored (:data:`patchlab.analysis.likelihood.LIKELIHOOD_METRICS` keys).
        settings: ``max_new_tokens``, ``template``, ``likelihood`` (:func:`evaluate`).
        provenance: the two checkpoints (source and weights digest) and the library versions
            (:func:`patchlab.provenance.pair_provenance`).

    Its JSON file (:meth:`save`) holds the :attr:`averages`, the rows and ``"partial": false`` (a finished test).
    """

    kind = "behavior"
    format = "patchlab.BehaviorResult/1"
    schema = BehaviorResultFile

    table: pd.DataFrame
    likelihood: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def averages(self) -> dict[str, dict[str, float]]:
        """``{"target": {"bleu": ..., "rouge_l": ..., "same": ..., "prob_after": ...}, "unrelated": {...}}``: the
        means per set of BLEU, ROUGE-L and ``same``, and each likelihood metric aggregated as TOFU reports it
        (:func:`patchlab.analysis.likelihood.aggregate`: the truth ratio as ``mean(min(R, 1/R))`` on the target
        set, ``mean(max(0, 1 - R))`` on the unrelated set; the probability as a mean)."""
        means = self.table.groupby("set")[[*METRICS, "same"]].mean()
        out = {s: {k: float(v) for k, v in means.loc[s].items()} for s in SETS if s in means.index}
        for s, metrics in out.items():
            rows = self.table[self.table["set"] == s]
            for name in self.likelihood:
                for side in ("before", "after"):
                    metrics[f"{name}_{side}"] = aggregate(name, s, rows[f"{name}_{side}"].tolist())
        return out

    @property
    def target_bleu(self) -> float:
        return self.averages["target"]["bleu"]

    @property
    def unrelated_bleu(self) -> float:
        return self.averages["unrelated"]["bleu"]

    def summary(self) -> dict[str, float]:
        """Flat averages: ``target_bleu``, ``target_rouge_l``, ``target_same``, ``unrelated_bleu``, ..."""
        return {f"{s}_{k}": v for s, metrics in self.averages.items() for k, v in metrics.items()}

    def to_frame(self) -> pd.DataFrame:
        """:attr:`table`: one row per question."""
        return self.table

    def figure(self, title: str | None = None) -> go.Figure:
        """Per-question BLEU and ROUGE-L, target and unrelated sets side by side
        (:func:`patchlab.reports.figures.behavior_scores`); the default title names the models."""
        return super().figure(title=title)

    def to_dict(self) -> dict[str, Any]:
        return results_record({"settings": self.settings, "provenance": self.provenance,
                               "likelihood": list(self.likelihood), "averages": self.averages,
                               "rows": self.table.to_dict("records")}, partial=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BehaviorResult:
        return cls(pd.DataFrame(data["rows"]), likelihood=tuple(data["likelihood"]), settings=data["settings"],
                   provenance=data["provenance"])


def score_answers(tokenizer: PreTrainedTokenizerBase, questions: Mapping[str, Sequence[str]],
                  before: Mapping[str, Sequence[torch.Tensor]], after: Mapping[str, Sequence[torch.Tensor]]
                  ) -> BehaviorResult:
    """Score after-answers against before-answers, per set (keys of ``questions``, e.g. target / unrelated)."""
    special = set(tokenizer.all_special_ids)
    rows = []
    for name, qs in questions.items():
        if not len(qs) == len(before[name]) == len(after[name]):
            raise PatchlabValueError(f"set {name!r}: {len(qs)} questions but {len(before[name])} before- and "
                                     f"{len(after[name])} after-answers")
        for q, b, a in zip(qs, before[name], after[name]):
            text_b = tokenizer.decode(b, skip_special_tokens=True)
            text_a = tokenizer.decode(a, skip_special_tokens=True)
            rows.append({"set": name, "question": q, "before": text_b, "after": text_a,
                         "bleu": sentence_bleu(text_a, text_b),
                         "rouge_l": rouge_l(_content_ids(a, special), _content_ids(b, special)),
                         "same": bool(torch.equal(a, b))})
    return BehaviorResult(pd.DataFrame(rows))


def _answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Mapping[str, Sequence[str]], *,
             max_new_tokens: int, template: str, progress: bool = False
             ) -> dict[str, list[Int[torch.Tensor, "answer"]]]:
    """Greedy answer ids of ``model`` per question set (:func:`patchlab.pair.generation.greedy_answers`)."""
    return {name: greedy_answers(model, tokenizer, qs, max_new_tokens=max_new_tokens, template=template,
                                 progress=progress)[1] for name, qs in questions.items()}


PairOrModels = ModelPair | SequentialPair | tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]


def _unpack(pair_or_models: PairOrModels) -> tuple[Callable[[str], contextlib.AbstractContextManager[PreTrainedModel]],
                                                   PreTrainedModel, PreTrainedTokenizerBase]:
    """``(use, config_model, tokenizer)``: ``use("vanilla" | "unlearned")`` is a context manager yielding that model
    (a :class:`~patchlab.pair.sequential.SequentialPair` loads it for the block only), ``config_model`` carries the
    pair's config (context length) without running."""
    if isinstance(pair_or_models, (ModelPair, SequentialPair)):
        return pair_or_models.using, pair_or_models.skeleton, pair_or_models.tokenizer
    if not (isinstance(pair_or_models, tuple) and len(pair_or_models) == 3 and
            all(isinstance(m, PreTrainedModel) for m in pair_or_models[:2]) and
            isinstance(pair_or_models[2], PreTrainedTokenizerBase)):
        raise PatchlabValueError("evaluate expects a patchlab ModelPair (in memory or sequential) or a tuple "
                                 "(vanilla_hf, unlearned_hf, tokenizer)")
    vanilla, unlearned, tok = pair_or_models
    models = {"vanilla": vanilla, "unlearned": unlearned}
    return lambda which: contextlib.nullcontext(models[which]), vanilla, tok


def evaluate(pair_or_models: PairOrModels, target_qa: Sequence[Any], unrelated_qa: Sequence[Any], *,
             max_new_tokens: int = 30, template: str = DEFAULT_TEMPLATE, likelihood: Sequence[str] = (),
             progress: bool = False) -> BehaviorResult:
    """Greedy answers of the vanilla and the unlearned model on target and unrelated questions, scored.

    Args:
        pair_or_models: a :class:`patchlab.pair.ModelPair` (in memory or sequential: each model is loaded in turn)
            or ``(vanilla_hf, unlearned_hf, tokenizer)``.
        target_qa, unrelated_qa: questions (strings, ``{"question": ...}`` records or objects with ``.question``,
            e.g. ``patchlab.toy.QA``). For TOFU, the forget split is the target set and the retain (or real
            authors, world facts) split the unrelated one.
        max_new_tokens: most answer tokens generated per question.
        template: prompt template holding ``{question}``.
        likelihood: TOFU likelihood metrics to add (:mod:`patchlab.analysis.likelihood`): ``"prob"`` (the
            probability of the record's ``answer``) and ``"truth_ratio"`` (its ``paraphrased_answer`` vs its
            ``perturbed_answer`` list), each under both models; the items must then carry those fields.

    Returns:
        A :class:`BehaviorResult` (per-question table, ``averages`` per set, the settings, both checkpoints).

    Raises:
        PatchlabValueError: an empty set, an item without a question (or without a field a likelihood metric
            needs), an unknown metric, a question too long for the model's context (before any model work).
    """
    use, config_model, tok = _unpack(pair_or_models)
    qa = {"target": target_qa, "unrelated": unrelated_qa}
    questions = {name: questions_of(items, name) for name, items in qa.items()}
    encoded = {name: encode_qa(config_model, tok, items, likelihood, questions=questions[name], template=template,
                               what=name) for name, items in qa.items()}  # validated before any model work
    answers, values = {}, {}
    for who, which in (("before", "vanilla"), ("after", "unlearned")):  # one model at a time
        with use(which) as model:
            answers[who] = _answers(model, tok, questions, max_new_tokens=max_new_tokens, template=template,
                                    progress=progress)
            values[who] = {name: likelihood_values(model, encoded[name], progress=progress) for name in qa}
            del model  # a sequential pair frees it before loading the other one
    result = score_answers(tok, questions, answers["before"], answers["after"])
    for who in values:
        for metric in encoded["target"]:
            result.table[f"{metric}_{who}"] = [v for name in qa for v in values[who][name][metric]]
    result.likelihood = tuple(encoded["target"])
    result.settings = {"max_new_tokens": max_new_tokens, "template": template, "likelihood": list(result.likelihood)}
    result.provenance = pair_provenance(pair_or_models[:2] if isinstance(pair_or_models, tuple) else pair_or_models)
    return result
