"""Behavioural tests of unlearning (Hong et al., section 4 and Fig. 2).

The vanilla and the unlearned model each answer every question greedily (``patchlab.pair.generation``: ids kept,
one prompt at a time, no padding). Each after-answer is scored against the before-answer of the same question:

* **BLEU**: sacrebleu's ``sentence_bleu`` (13a tokenisation, exponential smoothing, effective order), on the
  text decoded from the generated ids with special tokens skipped, on sacrebleu's 0-100 scale;
* **ROUGE-L**: the LCS-based F1 (:func:`rouge_l`) on the generated token ids themselves (special tokens
  dropped), on a 0-1 scale, so it needs no re-tokenisation.

100 BLEU / 1 ROUGE-L means the answer did not change. A good unlearning method drives the *target* scores down
and keeps the *unrelated* scores up. On QA records that carry reference answers, :func:`evaluate` also scores TOFU's
likelihood metrics under both models (``likelihood=("prob", "truth_ratio")``, :mod:`patchlab.analysis.likelihood`):
the probability of the answer, and the truth ratio of paraphrased vs perturbed answers. :func:`method_sweep` runs every unlearning method at several strengths and
plots target BLEU against unrelated BLEU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import plotly.graph_objects as go
import sacrebleu
import torch
from jaxtyping import Int
from pydantic import ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.analysis.likelihood import LIKELIHOOD_METRICS, aggregate, encode_qa, likelihood_values
from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, greedy_answers
from patchlab.io import OutputDir, atomic_write_json, output_dir, read_json
from patchlab.pair import ModelPair, ModelSpec, load_model
from patchlab.pair.sequential import SequentialPair
from patchlab.provenance import describe_source, environment, pair_provenance, weights_digest
from patchlab.results import Result, is_partial, register_result, results_record
from patchlab.schema import Count, FreeJson, Provenance, Schema, Unit, bad, validate

SETS = ("target", "unrelated")
METRICS = ("bleu", "rouge_l")


# ----------------------------------------------------------------------------------------------- metrics


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[Any], reference: Sequence[Any], *, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin, 2004) of two token sequences, in 0..1.

    With ``L = LCS(candidate, reference)``, ``P = L / len(candidate)``, ``R = L / len(reference)``:
    ``F = (1 + beta^2) P R / (R + beta^2 P)`` (``beta = 1``: the harmonic mean). Two empty sequences score 1,
    one empty sequence scores 0.
    """
    if beta <= 0:
        raise PatchlabValueError(f"beta must be > 0, got {beta}")
    if not candidate or not reference:
        return float(not candidate and not reference)
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU (default: 13a tokenisation, ``exp`` smoothing, effective order), 0..100.

    Identical strings score 100 (sacrebleu gives 0 for two empty strings).
    """
    if hypothesis.strip() == reference.strip():
        return 100.0
    return min(100.0, sacrebleu.sentence_bleu(hypothesis, [reference]).score)


# ----------------------------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------------------------- method sweep

def default_grid(methods: Sequence[str] | None = None) -> dict[str, tuple[dict[str, Any], ...]]:
    """The method sweep's strengths (weak to strong) of ``methods`` (default: every registered method), each
    method's ``sweep`` in :mod:`patchlab.unlearning.methods`: keyword arguments of
    :func:`patchlab.unlearning.unlearn` (fine-tuning: learning rates chosen on the toy world so the three points
    span partial to complete removal of the target answers) or of the editing baseline (the covariance weight)."""
    from patchlab.unlearning.methods import get_method, method_names

    return {name: get_method(name).sweep for name in (method_names() if methods is None else methods)}


_TASK_LISTS = ("forget", "retain", "target_questions", "unrelated_questions")


def _task_lists(path: Path, data: Mapping[str, Any]) -> dict[str, list[str]]:
    """The list fields of a task file's object (``cov_texts`` defaulting to ``forget + retain``), validated."""
    keys = (*_TASK_LISTS, "cov_texts") if "cov_texts" in data else _TASK_LISTS
    for key in keys:
        if not isinstance(data[key], list) or not data[key] or not all(isinstance(t, str) for t in data[key]):
            raise PatchlabValueError(f"{path}: field {key!r} must be a non-empty list of strings")
    lists = {key: list(data[key]) for key in keys}
    lists.setdefault("cov_texts", lists["forget"] + lists["retain"])
    return lists


def _task_subject(path: Path, subject: Any, target_questions: Sequence[str]) -> str:
    """A task file's subject: a non-empty string occurring in every target question (the editing baselines key
    their edit on its last token, see :func:`patchlab.unlearning.editing.subject_position`)."""
    if not isinstance(subject, str) or not subject.strip():
        raise PatchlabValueError(f"{path}: field 'subject' must be a non-empty string")
    for question in target_questions:
        if subject not in question:
            raise PatchlabValueError(f"{path}: the subject {subject!r} does not occur in the target question "
                                     f"{question!r}")
    return subject


@dataclass(frozen=True)
class SweepTask:
    """What a method sweep unlearns and how it judges the result.

    Attributes:
        name: a label for plots and records.
        forget, retain: texts the fine-tuning methods unlearn / keep (``retain`` is used by graddiff, npo_kl).
        target_questions, unrelated_questions: the behavioural test sets.
        subject: what the target questions are about (the editing baselines key their edit on it).
        cov_texts: text sample for the editing baselines' key covariance.
    """

    name: str
    forget: list[str]
    retain: list[str]
    target_questions: list[str]
    unrelated_questions: list[str]
    subject: str
    cov_texts: list[str]

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SweepTask:
        """A task from a JSON object with the fields of this class (``name`` optional, ``cov_texts`` defaulting to
        ``forget + retain``).

        Raises:
            PatchlabFileError: the file does not exist.
            PatchlabValueError: the file is not JSON, a field is missing or not of the right type, or the subject
                does not occur in some target question (the editing baselines key their edit on it).
        """
        path = Path(path)
        data = read_json(path, what="task file")
        if not isinstance(data, dict):
            raise PatchlabValueError(f"{path}: expected a JSON object with the fields of SweepTask")
        for key in (*_TASK_LISTS, "subject"):
            if key not in data:
                raise PatchlabValueError(f"{path}: missing field {key!r}")
        lists = _task_lists(path, data)
        return cls(name=str(data.get("name", path.stem)),
                   subject=_task_subject(path, data["subject"], lists["target_questions"]), **lists)

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over every field: runs of another task never count as done."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


def _no_template(settings: Mapping[str, Any]) -> None:
    if "template" in settings:
        raise PatchlabValueError("pass the prompt template as apply_method's template argument, not in settings")


def method_settings(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` of one sweep run checked against the registry; returns the method's own settings with every
    default filled in (so a run key changes when a default does).

    Raises:
        PatchlabValueError: unknown method, an unknown setting (listing the valid ones) or an invalid value, or
            ``template`` among the settings (it is the sweep's own argument).
    """
    from patchlab.unlearning.methods import get_method
    from patchlab.unlearning.trainer import split_settings

    _no_template(settings)
    entry = get_method(method)
    resolved = split_settings(method, settings)[1] if entry.kind == "finetune" else entry.make_settings(settings)
    return dataclasses.asdict(resolved)


def apply_method(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: SweepTask, method: str,
                 settings: Mapping[str, Any], *, template: str = DEFAULT_TEMPLATE, progress: bool = False
                 ) -> PreTrainedModel:
    """Unlearn ``task`` from ``model`` (in place) with the registered ``method`` and ``settings``; returns the
    model. Fine-tuning methods run :func:`patchlab.unlearning.unlearn` on the task's forget / retain texts; editing
    baselines edit the target questions' facts about ``task.subject`` (their ``apply``).

    ``template`` (holding ``{question}``) is the prompt the model is queried with: the editing baselines key
    their edit on it and the fine-tuning methods format QA records with it.

    Raises:
        PatchlabValueError: an unknown method, or ``settings`` holding ``template`` (pass it as an argument).
    """
    from patchlab.unlearning import editing, unlearn
    from patchlab.unlearning.methods import get_method

    _no_template(settings)
    entry = get_method(method)
    if entry.kind == "editing":
        requests = [editing.EditRequest(q, task.subject) for q in task.target_questions]
        return entry.apply(model, tokenizer, requests, entry.make_settings(settings), cov_texts=task.cov_texts,
                           template=template, progress=progress)
    return unlearn(model, task.forget, task.retain, tokenizer=tokenizer, method=method, template=template,
                   progress=progress, **settings).model


def run_key(task: SweepTask, method: str, strength: int, settings: Mapping[str, Any], model_id: str,
            max_new_tokens: int, template: str) -> str:
    """File-name key of one run: method, strength and a hash of everything its numbers depend on: the task, the
    settings (the method's defaults filled in), ``model_id`` (a content hash of the starting weights,
    :func:`patchlab.provenance.weights_digest`), ``max_new_tokens`` and ``template``."""
    spec = {"task": task.fingerprint(), "method": method, "settings": dict(settings),
            "method_settings": method_settings(method, settings), "model": model_id,
            "max_new_tokens": max_new_tokens, "template": template}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{method}-s{strength}-{digest}"


class SweepRecord(Schema):
    """One run's record in a method sweep's file; any other field (an average of :meth:`BehaviorResult.summary`)
    is a finite number."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float]

    method: Annotated[str, Field(min_length=1)]
    strength: Count
    settings: dict[str, FreeJson]
    target_bleu: Bleu
    target_rouge_l: Unit
    target_same: Unit
    unrelated_bleu: Bleu
    unrelated_rouge_l: Unit
    unrelated_same: Unit
    seconds: Annotated[float, Field(ge=0)]
    rows: Annotated[list[BehaviorRow], Field(min_length=1)]

    @model_validator(mode="after")
    def _columns(self) -> SweepRecord:
        _same_columns(self.rows, "rows")
        return self


class SweepResultFile(Schema):
    """A :class:`SweepResult` file: the task's name and at least one run's record."""

    format: Literal["patchlab.SweepResult/1"]
    partial: bool
    task: str
    provenance: Provenance
    records: Annotated[list[SweepRecord], Field(min_length=1)]


@register_result
@dataclass
class SweepResult(Result):
    """The records of a method sweep, one per (method, strength).

    Each record holds ``method``, ``strength`` (0 weakest), ``settings``, the averages of
    :meth:`BehaviorResult.summary` (``target_bleu``, ``unrelated_bleu``, ...), ``seconds`` (unlearning +
    evaluation wall time) and ``rows`` (the per-question table).

    Attributes:
        task: the task's name.
        records: the runs' records, in plan order.
        provenance: the vanilla checkpoint (source and weights digest), the settings (task fingerprint, the plan,
            ``max_new_tokens``, ``template``) and the library versions.
        partial: the sweep has runs left (an interrupted or running sweep's report); saved as the ``"partial"``
            flag (:func:`patchlab.results.results_record`).
    """

    kind = "method_sweep"
    stem = "sweep"
    format = "patchlab.SweepResult/1"
    schema = SweepResultFile

    task: str
    records: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    partial: bool = False

    def to_frame(self) -> pd.DataFrame:
        """One row per run (settings as a JSON string, per-question rows left out)."""
        rows = [{**{k: v for k, v in r.items() if k not in ("rows", "settings")},
                 "settings": json.dumps(r["settings"], sort_keys=True)} for r in self.records]
        return pd.DataFrame(rows)

    def figure(self, title: str | None = None) -> go.Figure:
        """Target BLEU (x) against unrelated BLEU (y) per run, coloured by method, each method's strengths joined
        weakest to strongest (Hong et al., Fig. 2)."""
        return super().figure(title=title)

    def to_dict(self) -> dict[str, Any]:
        return results_record({"task": self.task, "provenance": self.provenance, "records": self.records},
                              partial=self.partial)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        return cls(task=data["task"], records=data["records"], provenance=data["provenance"],
                   partial=is_partial(data))


def _plan(methods: Sequence[str], grid: Mapping[str, Sequence[Mapping[str, Any]]] | None
          ) -> list[tuple[str, int, dict]]:
    """(method, strength, settings) of every run, each checked against the registry before any run starts;
    ``grid=None``: :func:`default_grid` (each method's own sweep)."""
    from patchlab.unlearning.methods import method_names

    if isinstance(methods, str) or not methods:
        raise PatchlabValueError("methods must be a non-empty list of method names")
    plan = []
    for method in methods:
        if method not in method_names():
            raise PatchlabValueError(f"unknown method {method!r}; choose from {', '.join(method_names())}")
        strengths = (default_grid([method]) if grid is None else grid).get(method)
        if not strengths:
            raise PatchlabValueError(f"the grid holds no settings for method {method!r}")
        for i, settings in enumerate(strengths):
            method_settings(method, settings)
            plan.append((method, i, dict(settings)))
    return plan


def method_sweep(vanilla: ModelSpec, tokenizer: PreTrainedTokenizerBase, task: SweepTask,
                 out_dir: str | os.PathLike | OutputDir, *, methods: Sequence[str] | None = None,
                 grid: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, max_new_tokens: int = 30,
                 template: str = DEFAULT_TEMPLATE, progress: bool = True,
                 on_run: Callable[[dict[str, Any]], None] | None = None, overwrite: bool = False) -> SweepResult:
    """Unlearn ``task`` with every method at every strength of ``grid``, evaluate each, and report.

    Every run starts from a fresh copy of ``vanilla``; its record is written atomically to
    ``out_dir/runs/<method>-s<strength>-<hash>.json`` as soon as it finishes, and a run whose record exists is
    skipped, so an interrupted sweep resumes where it stopped (:func:`run_key`: the hash covers the task, the
    settings, a content hash of the starting weights, ``max_new_tokens`` and ``template``, so a checkpoint
    overwritten in place is never taken for the one a stored run started from). The report
    (:meth:`SweepResult.write_report`: ``sweep.json``, ``sweep.csv``, ``sweep.html``) is rewritten after every
    new run, so an interrupted sweep leaves an up-to-date one marked ``"partial": true``, and once at the end,
    marked ``"partial": false``, if resumed runs came last.
    ``out_dir`` is claimed before any run (:class:`patchlab.io.OutputDir`, kind ``"method_sweep"``): an earlier
    sweep there is resumed, or started afresh with ``overwrite=True``; a directory holding files patchlab did not
    write is refused.

    Args:
        vanilla: the starting model (directory, hub id or in-memory model; never modified).
        tokenizer: its tokenizer.
        task: forget/retain texts, test questions, subject (:class:`SweepTask`, e.g. :func:`patchlab.toy.sweep_task`).
        methods: registered method names (default: all, :func:`patchlab.unlearning.methods.method_names`).
        grid: settings per method (default :func:`default_grid`: each method's ``sweep``).
        max_new_tokens: greedy answer length limit. template: the prompt (holding ``{question}``) the models are
            queried with and the editing baselines key their edit on. on_run: called with each record (new or
            resumed).

    Returns:
        A :class:`SweepResult` with the records in plan order.
    """
    from patchlab.unlearning.methods import method_names

    methods = method_names() if methods is None else methods
    plan = _plan(methods, grid)
    out = output_dir(out_dir, "method_sweep", overwrite=overwrite, resume=not overwrite)
    model = load_model(vanilla)
    model_id = weights_digest(model)
    questions = {"target": questions_of(task.target_questions, "target"),
                 "unrelated": questions_of(task.unrelated_questions, "unrelated")}
    answers = functools.partial(_answers, tokenizer=tokenizer, questions=questions, max_new_tokens=max_new_tokens,
                                template=template)
    before: dict[str, list[torch.Tensor]] = {}
    provenance = {"vanilla": {"source": describe_source(vanilla), "weights": model_id},
                  "settings": {"task": task.name, "task_fingerprint": task.fingerprint(),
                               "plan": [{"method": m, "strength": i, "settings": st} for m, i, st in plan],
                               "max_new_tokens": max_new_tokens, "template": template},
                  "environment": environment()}
    result = SweepResult(task=task.name, provenance=provenance, partial=True)
    for i, (method, strength, settings) in enumerate(tqdm(plan, desc="method sweep", disable=not progress)):
        name = f"runs/{run_key(task, method, strength, settings, model_id, max_new_tokens, template)}.json"
        path = out.path / name
        new = not (out.resumed and path.is_file())
        if new:
            before = before or answers(model)
            start = time.perf_counter()
            edited = apply_method(copy.deepcopy(model), tokenizer, task, method, settings, template=template,
                                  progress=progress)
            scored = score_answers(tokenizer, questions, before, answers(edited))
            record = {"method": method, "strength": strength, "settings": settings, **scored.summary(),
                      "seconds": round(time.perf_counter() - start, 2), "rows": scored.table.to_dict("records")}
            out.write(name, lambda path: atomic_write_json(path, record))
        else:
            record = read_json(path, what="method-sweep run record")
            validate(SweepRecord, record, path, "patchlab method-sweep run record")
        result.records.append(record)
        result.partial = i < len(plan) - 1
        if new or not result.partial:  # after each new run, and once at the end
            result.write_report(out)
        if on_run is not None:
            on_run(record)
    return result
