"""The audit's building blocks: questions, scores with confidence intervals, probe results, the probe protocol and
the verdict thresholds the probes share.

A *probe* is one way of asking whether unlearning erased a concept or only hid it. Each is one :class:`Probe`
entry of :data:`patchlab.probes.registry.PROBES`: a function ``(pair, questions, *, unrelated, retain, settings,
progress, baselines) -> ProbeResult`` (:class:`ProbeFn`) whose result carries a headline score (with a bootstrap
confidence interval over questions), what the score means, and a verdict:

* ``"intact"``: the unlearned model still gives the answers (nothing to uncover);
* ``"hidden"``: the answers are gone from the output but the probe brings them back;
* ``"erased"``: the answers are gone and the probe does not bring them back;
* ``"inconclusive"``: the probe cannot decide on this pair (e.g. its attack also breaks the vanilla model, or a
  control learns as much from the data alone); :attr:`ProbeResult.reason` says why.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import plotly.graph_objects as go
from transformers import PreTrainedModel

from patchlab.errors import PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.pair.generation import DEFAULT_TEMPLATE, TEMPLATE_NAMES
from patchlab.pair.qa import QA
from patchlab.results import figure_function

if TYPE_CHECKING:
    from patchlab.probes.scoring import Baselines

VERDICTS = ("erased", "hidden", "intact", "inconclusive")
INCONCLUSIVE = "inconclusive"

#: The unlearned model still *answers* (verdict ``intact``) while its target accuracy is at least this share of the
#: vanilla model's: a probe cannot uncover knowledge the output still shows.
INTACT_SHARE = 0.5
#: A probe that brings back at least this share of what unlearning removed calls the knowledge ``hidden``.
HIDDEN_SHARE = 0.5

#: Settings every probe receives (each probe adds its own, see :attr:`Probe.defaults`): the vanilla reference
#: answers' length ``n_tokens`` (tokens), the prompt ``template``, and the bootstrap over questions (``n_boot``
#: resamples, a ``level`` central interval, ``seed``).
COMMON_DEFAULTS: dict[str, Any] = {"n_tokens": 30, "template": DEFAULT_TEMPLATE, "n_boot": 1000, "level": 0.95,
                                   "seed": 0}


def as_questions(items: Any, what: str = "target") -> list[QA]:
    """The audited questions (:class:`~patchlab.pair.qa.QA`, the answer ``None`` where not given: the vanilla
    model's greedy answer is then the reference) from strings, ``{"question", "answer"?}`` records or objects with
    ``.question`` / ``.answer`` (e.g. :class:`~patchlab.pair.qa.QA` itself).

    Raises:
        PatchlabValueError: no item, an empty question, an item of another form, or an empty answer.
    """
    if isinstance(items, str) or not isinstance(items, Sequence) or len(items) == 0:
        raise PatchlabValueError(f"the {what} questions must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            q, a = item, None
        elif isinstance(item, Mapping):
            q, a = item.get("question"), item.get("answer")
        else:
            q, a = getattr(item, "question", None), getattr(item, "answer", None)
        if not isinstance(q, str) or not q.strip():
            raise PatchlabValueError(f"{what} question {i} is not a non-empty string: {item!r}")
        if a is not None and (not isinstance(a, str) or not a.split()):
            raise PatchlabValueError(f"{what} question {i} has an empty or non-string answer: {item!r}")
        out.append(QA(q, a))
    return out


@dataclass(frozen=True)
class Interval:
    """A score and its bootstrap confidence interval ``[low, high]`` (same unit as the score; NaN when undefined)."""

    value: float
    low: float
    high: float

    def to_list(self) -> list[float | None]:
        """``[value, low, high]``, NaN as ``None`` (JSON)."""
        return [None if math.isnan(x) else float(x) for x in (self.value, self.low, self.high)]

    @classmethod
    def from_list(cls, values: Sequence[float | None]) -> Interval:
        value, low, high = (math.nan if x is None else float(x) for x in values)
        return cls(value, low, high)

    def format(self, digits: int = 2) -> str:
        """``"0.82 [0.61, 0.95]"``, or ``"n/a"`` when undefined."""
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class ProbeResult:
    """What one probe found on one pair.

    Attributes:
        probe: the probe's registry name.
        score: the headline score with its bootstrap confidence interval over questions.
        meaning: what the score measures, its unit and direction, in one sentence.
        verdict: ``"erased"``, ``"hidden"``, ``"intact"`` or ``"inconclusive"`` (:data:`VERDICTS`).
        rule: the verdict rule with its thresholds, as applied.
        details: every number behind the score and the probe's figure (JSON-serialisable: curves with their
            intervals as ``[value, low, high]``, per-question values).
        note: a short remark on this pair's score (e.g. where the best KRS window lies), shown beside it.
        seconds: wall time of the probe (s), set by the audit runner (:func:`patchlab.probes.audit_many`; 0 from a
            direct ``probe.run`` call).
        reason: why the verdict is ``inconclusive`` (empty otherwise), in one sentence.
    """

    probe: str
    score: Interval
    meaning: str
    verdict: str
    rule: str
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise PatchlabValueError(f"a verdict is one of {VERDICTS}, got {self.verdict!r}")
        if (self.verdict == INCONCLUSIVE) != bool(self.reason):
            raise PatchlabValueError(f"an inconclusive verdict, and only it, carries a reason; got verdict "
                                     f"{self.verdict!r} with reason {self.reason!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score.to_list()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        return cls(**{**data, "score": Interval.from_list(data["score"])})


class ProbeFn(Protocol):
    """A probe's function: audit ``pair`` on ``questions`` with the resolved ``settings`` (common + the probe's).

    ``unrelated``: the unrelated questions, ``retain``: a model that never saw the concept (each ``None`` when the
    case lacks it), ``progress``: show progress bars. ``baselines``
    (:class:`patchlab.probes.scoring.Baselines`): the reference answers and vanilla / unlearned scores shared by the
    probes of one audited case; a probe that needs them asks ``baselines.get(pair, questions, settings,
    progress)``, any other leaves it unread. The audit runner passes one per case; a direct call passes
    ``Baselines()``.
    """

    def __call__(self, pair: ModelPair, questions: list[QA], *, unrelated: list[QA] | None,
                 retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool,
                 baselines: Baselines) -> ProbeResult: ...


#: The keyword arguments every probe function takes (:class:`ProbeFn`).
PROBE_KEYWORDS = ("unrelated", "retain", "settings", "progress", "baselines")


def check_probe_fn(name: str, run: Callable[..., ProbeResult]) -> None:
    """Check that ``run`` takes the keywords of a probe function, :data:`PROBE_KEYWORDS` (or ``**kwargs``), so a
    probe written for another signature is refused when it is registered, not in the middle of an audit.

    Raises:
        PatchlabValueError: ``run`` is not callable or lacks a keyword (naming them).
    """
    if not callable(run):
        raise PatchlabValueError(f"probe {name!r}: run must be a function, got {type(run).__name__}")
    params = inspect.signature(run).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [k for k in PROBE_KEYWORDS if k not in named]
    if missing:
        raise PatchlabValueError(f"probe {name!r}: run must take the keyword arguments {', '.join(PROBE_KEYWORDS)} "
                                 f"(patchlab.probes.base.ProbeFn); it lacks {', '.join(missing)}")


#: Draws one probe's results for several audited pairs side by side: ``[(label, result), ...] -> figure``.
FigureFn = Callable[[Sequence[tuple[str, ProbeResult]]], go.Figure]

#: Checks a probe's resolved settings (common + its own) against one audited pair before any compute, raising
#: :class:`~patchlab.errors.PatchlabValueError` on a bad value.
CheckFn = Callable[[Mapping[str, Any], ModelPair], None]


def check_common(settings: Mapping[str, Any]) -> None:
    """Validate the shared options (:data:`COMMON_DEFAULTS`) before any compute.

    Raises:
        PatchlabValueError: ``n_tokens`` or ``n_boot`` not a positive integer, ``level`` outside ``(0, 1)``, a
            ``seed`` that is not an integer, a ``template`` that is neither a name (``"default"``, ``"chat"``: the
            tokenizer's chat template, resolved per audited pair) nor a text holding ``{question}``.
    """
    for name in ("n_tokens", "n_boot"):
        if not isinstance(settings[name], int) or isinstance(settings[name], bool) or settings[name] < 1:
            raise PatchlabValueError(f"{name} must be a positive integer, got {settings[name]!r}")
    if not isinstance(settings["level"], (int, float)) or not 0 < settings["level"] < 1:
        raise PatchlabValueError(f"level must be in (0, 1), got {settings['level']!r}")
    if not isinstance(settings["seed"], int) or isinstance(settings["seed"], bool):
        raise PatchlabValueError(f"seed must be an integer, got {settings['seed']!r}")
    template = settings["template"]
    if not isinstance(template, str) or (template not in TEMPLATE_NAMES and "{question}" not in template):
        raise PatchlabValueError(f"template must be one of {TEMPLATE_NAMES} or a string holding {{question}}, got "
                                 f"{template!r}")


@dataclass(frozen=True)
class Probe:
    """One registry entry.

    Attributes:
        name: registry key (``"krs"``, ``"relearning"``...). title: section title in the report.
        run: the probe function (:class:`ProbeFn`).
        defaults: the probe's own settings and their defaults (overridable per audit).
        draw: its figure over several pairs (:data:`FigureFn`, called by :meth:`figure`); ``None``: the one
            registered for :attr:`name` with :func:`patchlab.results.register_figure` (the presentation layer,
            :mod:`patchlab.reports.views`, draws the built-in probes so).
        needs: inputs the probe cannot run without: ``"unrelated"`` (questions) and/or ``"retain"`` (model).
        description: how the probe works and how to read its figure, in plain text, for the report.
        check: validates the probe's settings against each audited pair before any compute (:data:`CheckFn`).
    """

    name: str
    title: str
    run: ProbeFn
    defaults: Mapping[str, Any]
    draw: FigureFn | None = None
    needs: tuple[str, ...] = ()
    description: str = ""
    check: CheckFn | None = None

    def figure(self, results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
        """The probe's figure of ``[(pair label, its result)]``: :attr:`draw`, else the figure function registered
        for :attr:`name`.

        Raises:
            PatchlabValueError: neither exists.
        """
        return (self.draw or figure_function(self.name))(results)


def accuracy_share(vanilla_accuracy: float, unlearned_accuracy: float) -> float:
    """The unlearned model's target accuracy as a share of the vanilla model's (1 when the vanilla model answers
    nothing, so nothing can be called removed)."""
    return unlearned_accuracy / vanilla_accuracy if vanilla_accuracy > 0 else 1.0


#: Why a probe cannot decide when the vanilla model itself answers none of the target questions.
NO_VANILLA_ANSWERS = "the vanilla model answers none of the target questions: there is no knowledge to look for"


def output_verdict(vanilla_accuracy: float, unlearned_accuracy: float) -> tuple[str, str] | None:
    """(verdict, reason) decided by the output alone, before any probe looks inside: ``inconclusive`` when the
    vanilla model answers nothing (unless the unlearned model answers too: then ``intact``), ``intact`` when the
    unlearned model keeps at least :data:`INTACT_SHARE` of the vanilla target accuracy; ``None`` otherwise (the
    probe decides)."""
    if vanilla_accuracy <= 0 and unlearned_accuracy <= 0:
        return INCONCLUSIVE, NO_VANILLA_ANSWERS
    if accuracy_share(vanilla_accuracy, unlearned_accuracy) >= INTACT_SHARE:
        return "intact", ""
    return None


def recovery_verdict(recovery: float, vanilla_accuracy: float, unlearned_accuracy: float, attack: str
                     ) -> tuple[str, str, str]:
    """(verdict, rule, reason) of a probe that measures how much of the removed knowledge an ``attack`` brings
    back.

    :func:`output_verdict` first (``intact``, or ``inconclusive`` when the vanilla model answers nothing); else
    ``inconclusive`` when the recovery is undefined (NaN), ``hidden`` when it is at least :data:`HIDDEN_SHARE`,
    else ``erased``. ``reason`` is empty unless the verdict is ``inconclusive``.
    """
    rule = (f"intact if the unlearned model keeps >= {INTACT_SHARE:.0%} of the vanilla target accuracy; else hidden "
            f"if {attack} recovers >= {HIDDEN_SHARE:.0%} of it; else erased; inconclusive when the vanilla model "
            "answers nothing or the recovery is undefined")
    decided = output_verdict(vanilla_accuracy, unlearned_accuracy)
    if decided is not None:
        return decided[0], rule, decided[1]
    if math.isnan(recovery):
        return INCONCLUSIVE, rule, f"the recovery by {attack} is undefined"
    return ("hidden" if recovery >= HIDDEN_SHARE else "erased"), rule, ""
