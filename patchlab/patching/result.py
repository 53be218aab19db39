"""The result of a patching sweep: a score per component, layer window and question."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from pydantic import Field, model_validator

from patchlab.errors import PatchlabValueError
from patchlab.patching.metrics import pool
from patchlab.patching.windows import Window, window_label
from patchlab.results import Result, model_names, register_result
from patchlab.schema import Count, FreeJson, NonEmpty, Provenance, Schema, bad

AGGREGATES = ("mean", "pooled")


class _SweepFile(Schema):
    """The fields a sweep's file holds in every format; :meth:`_shapes` checks its tables against each other."""

    settings: dict[str, FreeJson]
    windows: Annotated[list[Annotated[list[Count], Field(min_length=2, max_length=2)]], Field(min_length=1)]
    questions: Annotated[list[str], Field(min_length=1)]
    answers: list[str]
    per_question: Annotated[dict[NonEmpty, list[list[float]]], Field(min_length=1)]

    def _shapes(self, scores_field: str, weights_field: str) -> None:
        """Every window is ``[start, stop)`` with ``start < stop``; one answer per question; the same components in
        ``scores_field`` and ``per_question``; per component ``[n_windows]`` scores and ``[n_questions, n_windows]``
        per-question scores; ``[n_questions]`` weights (``weights_field``, may be null)."""
        n_q, n_w = len(self.questions), len(self.windows)
        for i, (start, stop) in enumerate(self.windows):
            if start >= stop:
                raise bad(f"windows[{i}]", "a window is [start, stop) with start < stop, got [{start}, {stop}]",
                          start=start, stop=stop)
        if len(self.answers) != n_q:
            raise bad("answers", "{n} answers for {q} questions", n=len(self.answers), q=n_q)
        scores, weights = getattr(self, scores_field), getattr(self, weights_field)
        if list(scores) != list(self.per_question):
            raise bad(scores_field, "components {a} differ from per_question's {b}", a=list(scores),
                      b=list(self.per_question))
        for comp, values in scores.items():
            if len(values) != n_w:
                raise bad(f"{scores_field}.{comp}", "{n} scores for {w} windows", n=len(values), w=n_w)
            rows = self.per_question[comp]
            if len(rows) != n_q:
                raise bad(f"per_question.{comp}", "{n} rows for {q} questions", n=len(rows), q=n_q)
            for k, row in enumerate(rows):
                if len(row) != n_w:
                    raise bad(f"per_question.{comp}[{k}]", "{n} scores for {w} windows", n=len(row), w=n_w)
        if weights is not None and len(weights) != n_q:
            raise bad(weights_field, "{n} weights for {q} questions", n=len(weights), q=n_q)


class PatchResultFile(_SweepFile):
    """A :class:`PatchResult` file (``patchlab.PatchResult/1``): every score finite."""

    format: Literal["patchlab.PatchResult/1"]
    metric: NonEmpty
    provenance: Provenance
    weights: list[float] | None
    scores: Annotated[dict[NonEmpty, list[float]], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> PatchResultFile:
        self._shapes("scores", "weights")
        return self


class LegacyKRSFile(_SweepFile):
    """A KRS sweep's file of the first format (``patchlab.KRSResult/1``): ``krs`` and ``mse_unlearned`` for
    ``scores`` and ``weights``, no metric."""

    format: Literal["patchlab.KRSResult/1"]
    provenance: Provenance = Provenance()
    mse_unlearned: list[float]
    krs: Annotated[dict[NonEmpty, list[float]], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> LegacyKRSFile:
        self._shapes("krs", "mse_unlearned")
        return self


@register_result
@dataclass
class PatchResult(Result):
    """A patching sweep: mean and per-question scores of one metric for each component and layer window.

    Attributes:
        scores: component -> ``[n_windows]`` mean score over questions (indexed like ``windows``; for centred
            windows index ``c`` is the window centred on layer ``c``).
        per_question: component -> ``[n_questions, n_windows]``.
        windows: half-open layer ranges ``(start, stop)``.
        questions: the questions, in order.
        answers: the vanilla reference answers, decoded (the sweep itself used their token ids).
        weights: ``[n_questions]`` the metric's per-question denominators (for KRS, ``MSE(l_u, l_v)``), the weights
            of :meth:`pooled`; ``None`` for metrics without a pooled form.
        metric: the metric's name (``"krs"``...).
        settings: n_tokens, window, window_mode, positions, prompt_template, engine, n_layers, metric, heads.
        provenance: the checkpoints (source and weights digest), versions and settings (:mod:`patchlab.provenance`).
    """

    kind = "krs"
    format = "patchlab.PatchResult/1"
    schema = PatchResultFile
    legacy_formats = {"patchlab.KRSResult/1": LegacyKRSFile}

    scores: dict[str, np.ndarray]
    per_question: dict[str, np.ndarray]
    windows: list[Window]
    questions: list[str]
    answers: list[str]
    weights: np.ndarray | None = None
    metric: str = "krs"
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return list(self.scores)

    @property
    def krs(self) -> dict[str, np.ndarray]:
        """:attr:`scores` of a KRS sweep (the paper's name)."""
        if self.metric != "krs":
            raise PatchlabValueError(f"this sweep scored {self.metric!r}, not KRS: use .scores")
        return self.scores

    @property
    def mse_unlearned(self) -> np.ndarray:
        """``[n_questions]`` MSE(l_u, l_v) of a KRS sweep, the denominator of each question's KRS."""
        if self.metric != "krs" or self.weights is None:
            raise PatchlabValueError(f"this sweep scored {self.metric!r}, not KRS")
        return self.weights

    def pooled(self) -> dict[str, np.ndarray]:
        """The metric with numerators and denominators summed over questions before the ratio: component ->
        ``[n_windows]`` of ``1 - Σ_q w_q (1 - s_q) / Σ_q w_q``. For KRS that is the paper's Eq. 3 read literally,
        ``1 - mean_q MSE(l_r, l_v) / mean_q MSE(l_u, l_v)``, exact from the stored numbers since
        ``MSE(l_r, l_v) = (1 - KRS_q) MSE(l_u, l_v)``. Questions whose unlearned model moved further from the vanilla
        one weigh more than in the plain mean :attr:`scores`.

        Raises:
            PatchlabValueError: the metric has no pooled form.
        """
        if self.weights is None:
            raise PatchlabValueError(f"metric {self.metric!r} has no pooled form")
        return {c: pool(v, self.weights) for c, v in self.per_question.items()}

    def aggregated(self, aggregate: str = "mean") -> dict[str, np.ndarray]:
        """:attr:`scores` (``"mean"``, the mean of per-question scores) or :meth:`pooled` (``"pooled"``)."""
        if aggregate not in AGGREGATES:
            raise PatchlabValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        return self.scores if aggregate == "mean" else self.pooled()

    def window_labels(self) -> list[int]:
        """x-axis labels: the centre layer (centred windows) or the first layer (fixed or explicit windows)."""
        if self.settings.get("window_mode", "centered") == "centered":
            return list(range(len(self.windows)))
        return [start for start, _ in self.windows]

    def to_frame(self, per_question: bool = False) -> pd.DataFrame:
        """Long table: one row per (component, window) with the mean score, its std over questions, the pooled
        score (when the metric has one) and the question count; with ``per_question=True`` one row per
        (component, window, question) with that question's score."""
        pooled = self.pooled() if self.weights is not None else None
        rows = []
        for comp, values in self.per_question.items():
            for w, ((start, stop), label) in enumerate(zip(self.windows, self.window_labels())):
                base = {"component": comp, "window": label, "layers": window_label((start, stop)),
                        "start": start, "stop": stop}
                if per_question:
                    rows += [{**base, "question_index": k, "question": q, self.metric: float(values[k, w])}
                             for k, q in enumerate(self.questions)]
                    continue
                row = {**base, self.metric: float(self.scores[comp][w]), f"{self.metric}_std": float(values[:, w].std()),
                       "n_questions": values.shape[0]}
                if pooled is not None:
                    row[f"{self.metric}_pooled"] = float(pooled[comp][w])
                rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "settings": self.settings, "provenance": self.provenance,
                "windows": [list(w) for w in self.windows], "questions": self.questions, "answers": self.answers,
                "weights": None if self.weights is None else self.weights.tolist(),
                "scores": {c: v.tolist() for c, v in self.scores.items()},
                "per_question": {c: v.tolist() for c, v in self.per_question.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchResult:
        legacy = data["format"] == "patchlab.KRSResult/1"
        weights = data["mse_unlearned"] if legacy else data["weights"]
        return cls(scores={c: np.asarray(v) for c, v in data["krs" if legacy else "scores"].items()},
                   per_question={c: np.asarray(v) for c, v in data["per_question"].items()},
                   windows=[tuple(w) for w in data["windows"]], questions=data["questions"],
                   answers=data["answers"], weights=None if weights is None else np.asarray(weights),
                   metric="krs" if legacy else data["metric"], settings=data["settings"],
                   provenance=data.get("provenance", {}))

    @property
    def value_name(self) -> str:
        """The metric's display name (``"KRS"`` for ``krs``)."""
        return "KRS" if self.metric == "krs" else self.metric

    def model_names(self) -> tuple[str | None, str | None]:
        """``(vanilla, unlearned)`` short names from the provenance, for titles
        (:func:`~patchlab.results.model_names`)."""
        return model_names(self.provenance)

    def figure(self, title: str | None = None, *, aggregate: str = "mean", per_question: bool = False) -> go.Figure:
        """Interactive heatmap, component x layer window, on a diverging colour scale centred on 0 (a negative score
        means the restoration made things worse), values in the cells, each window's layers on the x axis.

        Args:
            aggregate: ``"mean"`` (mean of per-question scores) or ``"pooled"`` (:meth:`pooled`).
            per_question: instead of the aggregate, the questions (rows, ranked by their mean score) x windows of
                one component at a time, picked from a dropdown; the highest and lowest ranked only beyond
                :data:`~patchlab.reports.figures.QUESTION_ROWS` questions
                (:func:`~patchlab.reports.figures.question_heatmap`).
        """
        return super().figure(title=title, aggregate=aggregate, per_question=per_question)

    heatmap = figure

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{kind}.csv`` (one row per component and window) and ``{kind}_per_question.csv`` (one row per question)."""
        return {self.kind: self.to_frame(), f"{self.kind}_per_question": self.to_frame(per_question=True)}

    def figures(self, aggregate: str = "mean") -> dict[str, go.Figure]:
        """The aggregate heatmap (``aggregate``: ``"mean"`` or ``"pooled"``) and the per-question panels."""
        return {self.kind: self.figure(aggregate=aggregate), f"{self.kind}_per_question": self.figure(per_question=True)}


#: The paper's name for a KRS sweep's result.
KRSResult = PatchResult


#: Settings two sweeps must share to be compared (the engine and batch size may differ: they give the same numbers).
COMPARED_SETTINGS = ("n_tokens", "window", "window_mode", "positions", "prompt_template", "n_layers", "metric", "heads")


class PatchComparisonFile(Schema):
    """A :class:`PatchComparison` file: two distinct labels and two sweeps of the same metric, components and
    windows."""

    format: Literal["patchlab.PatchComparison/1"]
    labels: Annotated[list[NonEmpty], Field(min_length=2, max_length=2)]
    a: PatchResultFile
    b: PatchResultFile

    @model_validator(mode="after")
    def _comparable(self) -> PatchComparisonFile:
        if self.labels[0] == self.labels[1]:
            raise bad("labels", "the two labels must differ, got {label!r} twice", label=self.labels[0])
        for field_, name, of_a, of_b in (("metric", "metric", self.a.metric, self.b.metric),
                                         ("windows", "windows", self.a.windows, self.b.windows),
                                         ("scores", "components", list(self.a.scores), list(self.b.scores))):
            if of_a != of_b:
                raise bad(f"b.{field_}", "the sweeps differ in {name}: {a} vs {b}", name=name, a=of_a, b=of_b)
        return self


@register_result
@dataclass
class PatchComparison(Result):
    """Two sweeps side by side, ``a`` and ``b``, and their difference ``b - a`` per component and window.

    Attributes:
        a, b: the two sweeps (same settings, components and windows).
        labels: their display names (default: the unlearned checkpoints' short names).
    """

    kind = "krs_comparison"
    format = "patchlab.PatchComparison/1"
    schema = PatchComparisonFile

    a: PatchResult
    b: PatchResult
    labels: tuple[str, str] = ("a", "b")

    def difference(self, aggregate: str = "mean") -> dict[str, np.ndarray]:
        """component -> ``[n_windows]`` of ``b - a``."""
        a, b = self.a.aggregated(aggregate), self.b.aggregated(aggregate)
        return {c: b[c] - a[c] for c in self.a.components}

    def to_frame(self, aggregate: str = "mean") -> pd.DataFrame:
        """One row per (component, window): the score of each sweep and ``b - a``."""
        a, b = self.a.aggregated(aggregate), self.b.aggregated(aggregate)
        rows = []
        for comp in self.a.components:
            for w, (start, stop) in enumerate(self.a.windows):
                rows.append({"component": comp, "layers": window_label((start, stop)), "start": start,
                             "stop": stop, self.labels[0]: float(a[comp][w]), self.labels[1]: float(b[comp][w]),
                             "difference": float(b[comp][w] - a[comp][w])})
        return pd.DataFrame(rows)

    def figure(self, *, aggregate: str = "mean") -> go.Figure:
        """Three heatmaps on one diverging scale centred on 0: ``a``, ``b`` and ``b - a``."""
        return super().figure(aggregate=aggregate)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "a": self.a.to_dict() | {"format": self.a.format},
                "b": self.b.to_dict() | {"format": self.b.format}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchComparison:
        return cls(PatchResult.from_dict(data["a"]), PatchResult.from_dict(data["b"]), tuple(data["labels"]))


def compare(a: PatchResult, b: PatchResult, labels: tuple[str, str] | None = None) -> PatchComparison:
    """Two sweeps side by side and their difference (:class:`PatchComparison`), e.g. two unlearning methods on the
    same questions.

    Raises:
        PatchlabValueError: the sweeps differ in a setting of :data:`COMPARED_SETTINGS`, in their components or in
            their windows (their numbers would not mean the same thing).
    """
    if not isinstance(a, PatchResult) or not isinstance(b, PatchResult):
        raise PatchlabValueError("compare takes two PatchResult sweeps (patchlab.krs_sweep / patch_sweep results)")
    for key in COMPARED_SETTINGS:
        if a.settings.get(key) != b.settings.get(key):
            raise PatchlabValueError(f"the sweeps were computed with different {key}: {a.settings.get(key)!r} vs "
                                     f"{b.settings.get(key)!r}; compare sweeps with the same settings")
    if a.components != b.components or list(map(tuple, a.windows)) != list(map(tuple, b.windows)):
        raise PatchlabValueError("the sweeps restore different components or windows")
    if labels is None:
        names = [r.model_names()[1] or "" for r in (a, b)]
        labels = (names[0] or "a", names[1] or "b") if names[0] != names[1] else ("a", "b")
    return PatchComparison(a, b, tuple(labels))
