"""The method sweep (Hong et al., Fig. 2): every registered unlearning method at several strengths, each run
evaluated with the behavioural tests (:func:`patchlab.analysis.behavior.score_answers`) and recorded resumably;
:class:`SweepResult` plots target BLEU against unrelated BLEU."""

from __future__ import annotations

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
import torch
from pydantic import ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.analysis.behavior import Bleu, BehaviorRow, _answers, _same_columns, questions_of, score_answers
from patchlab.errors import PatchlabValueError
from patchlab.io import OutputDir, atomic_write_json, output_dir, read_json
from patchlab.pair import ModelSpec, load_model
from patchlab.pair.generation import DEFAULT_TEMPLATE
from patchlab.provenance import describe_source, environment, weights_digest
from patchlab.results import Result, is_partial, register_result, results_record
from patchlab.schema import Count, FreeJson, Provenance, Schema, Unit, validate
from patchlab.unlearning import editing, unlearn
from patchlab.unlearning.methods import get_method, method_names
from patchlab.unlearning.trainer import split_settings


def default_grid(methods: Sequence[str] | None = None) -> dict[str, tuple[dict[str, Any], ...]]:
    """The method sweep's strengths (weak to strong) of ``methods`` (default: every registered method), each
    method's ``sweep`` in :mod:`patchlab.unlearning.methods`: keyword arguments of
    :func:`patchlab.unlearning.unlearn` (fine-tuning: learning rates chosen on the toy world so the three points
    span partial to complete removal of the target answers) or of the editing baseline (the covariance weight)."""
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
