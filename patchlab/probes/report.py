"""The audit report: every probe's result for one or several audited pairs, side by side, as a table, a JSON file
holding every number, figures and one self-contained HTML page (plotly's JavaScript inlined: it opens offline), on
the result protocol (:class:`patchlab.results.Result`)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from pydantic import ConfigDict, Field, model_validator

from patchlab.probes.base import INCONCLUSIVE, VERDICTS, ProbeResult
from patchlab.probes.registry import PROBES
from patchlab.errors import PatchlabValueError
from patchlab.results import Result, register_result
from patchlab.schema import Checkpoint, FreeJson, NonEmpty, Schema, bad

AUDIT_FORMAT = "patchlab.AuditReport/1"
#: Verdict colours: erased (what unlearning promises) green, hidden orange, intact red, inconclusive (the probe
#: cannot decide on this pair) grey.
VERDICT_COLOURS = {"erased": "#1a9850", "hidden": "#f39c12", "intact": "#d73027", "inconclusive": "#7f7f7f"}


@dataclass
class AuditRun:
    """The audit of one pair.

    Attributes:
        label: the pair's name in the report (e.g. ``"graddiff"``).
        results: probe name -> result, in the order they ran.
        skipped: probe name -> why it did not run (e.g. it needs unrelated questions).
        provenance: checkpoint sources and weight digests, tokenizer digest, questions, resolved settings, versions.
    """

    label: str
    results: dict[str, ProbeResult]
    skipped: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def overall(self) -> str:
        """One sentence over the probes: how many gave each verdict, and the inconclusive ones with their reasons
        (``"2 erased, 1 hidden, 1 inconclusive (quantization: ...)"``)."""
        counts = [f"{sum(r.verdict == v for r in self.results.values())} {v}" for v in VERDICTS
                  if any(r.verdict == v for r in self.results.values())]
        why = "; ".join(f"{name}: {r.reason}" for name, r in self.results.items() if r.verdict == INCONCLUSIVE)
        return f"verdicts: {', '.join(counts) or 'none'}" + (f" (inconclusive: {why})" if why else "")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "results": {k: r.to_dict() for k, r in self.results.items()},
                "skipped": self.skipped, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRun:
        return cls(label=data["label"], results={k: ProbeResult.from_dict(r) for k, r in data["results"].items()},
                   skipped=dict(data["skipped"]), provenance=dict(data["provenance"]))


class ProbeResultFile(Schema):
    """A probe's result in an audit file (:meth:`ProbeResult.to_dict`): the score as ``[value, low, high]``, each
    ``null`` when undefined; the details are free JSON (each probe's figure reads its own)."""

    probe: NonEmpty
    score: Annotated[list[float | None], Field(min_length=3, max_length=3)]
    meaning: str
    verdict: Literal[VERDICTS]
    rule: str
    details: dict[str, FreeJson]
    note: str
    seconds: Annotated[float, Field(ge=0)]
    #: why the verdict is inconclusive (empty otherwise; absent in files written before it existed)
    reason: str = ""


class AuditProvenance(Schema):
    """An audited pair's provenance: the checkpoints (``retain`` may be ``null``), the questions, the settings, the
    versions; other keys are free JSON."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, FreeJson]

    checkpoints: dict[str, Checkpoint | None] = {}
    questions: list[FreeJson] = []
    unrelated: list[FreeJson] | None = None
    settings: dict[str, FreeJson] = {}
    environment: dict[str, str] = {}


class AuditRunFile(Schema):
    """One audited pair in an audit file: each result filed under its probe's name."""

    label: NonEmpty
    results: dict[str, ProbeResultFile]
    skipped: dict[str, str]
    provenance: AuditProvenance

    @model_validator(mode="after")
    def _named(self) -> AuditRunFile:
        for name, result in self.results.items():
            if result.probe != name:
                raise bad(f"results.{name}.probe", "the result of probe {probe!r} is filed under {name!r}",
                          probe=result.probe, name=name)
        return self


class AuditReportFile(Schema):
    """An :class:`AuditReport` file: one or more audited pairs with distinct labels."""

    format: Literal["patchlab.AuditReport/1"]
    runs: Annotated[list[AuditRunFile], Field(min_length=1)]
    trust: dict[str, FreeJson] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> AuditReportFile:
        labels = [run.label for run in self.runs]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise bad(f"runs[{i}].label", "a second audited pair labelled {label!r}", label=label)
        return self


@register_result
@dataclass
class AuditReport(Result):
    """Audits of one or several pairs (concepts, unlearning methods...), shown side by side.

    Its report (:meth:`write_report`) is ``audit.json`` (every number, the provenance), ``audit.csv``
    (:meth:`to_frame`) and one self-contained page, ``audit.html`` (:meth:`html`).

    Attributes:
        runs: one :class:`AuditRun` per audited pair, in column order.
    """

    kind = "audit"
    format = AUDIT_FORMAT
    schema = AuditReportFile

    runs: list[AuditRun]
    #: A meta-evaluation's trust file (:func:`patchlab.meta_evaluation.read_trust`): which probes the overall
    #: verdict (:meth:`overall`) believes, and why; ``None``: every probe counts.
    trust: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        labels = [r.label for r in self.runs]
        if not labels:
            raise PatchlabValueError("an audit report needs at least one audited pair")
        if len(set(labels)) != len(labels):
            raise PatchlabValueError(f"audited pairs need distinct labels, got {labels}")

    @classmethod
    def concat(cls, reports: Sequence[AuditReport]) -> AuditReport:
        """One report holding the runs of ``reports`` side by side (labels must stay distinct)."""
        return cls([run for report in reports for run in report.runs], trust=reports[0].trust if reports else None)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    @property
    def probes(self) -> list[str]:
        """Probe names run or skipped in any run: registry order first, then any others (e.g. from a newer
        version)."""
        present = {name for r in self.runs for name in (*r.results, *r.skipped)}
        return [n for n in PROBES if n in present] + sorted(present - set(PROBES))

    def result(self, label: str, probe: str) -> ProbeResult:
        """The result of ``probe`` on the pair ``label``; raises naming what exists."""
        for run in self.runs:
            if run.label == label:
                if probe not in run.results:
                    raise PatchlabValueError(f"{label!r} has no {probe!r} result; it has {list(run.results)}")
                return run.results[probe]
        raise PatchlabValueError(f"no audited pair labelled {label!r}; labels: {self.labels}")

    # ------------------------------------------------------------------------------------------------ tables

    def to_frame(self) -> pd.DataFrame:
        """One row per (pair, probe): ``label``, ``probe``, ``score``, ``low``, ``high`` (its interval),
        ``verdict``, ``meaning``, ``note``, ``rule``, ``seconds``, ``reason`` (why inconclusive, else empty)."""
        rows = [{"label": run.label, "probe": name, "score": r.score.value, "low": r.score.low,
                 "high": r.score.high, "verdict": r.verdict, "meaning": r.meaning, "note": r.note, "rule": r.rule,
                 "seconds": r.seconds, "reason": r.reason}
                for run in self.runs for name, r in run.results.items()]
        return pd.DataFrame(rows, columns=["label", "probe", "score", "low", "high", "verdict", "meaning", "note",
                                           "rule", "seconds", "reason"])

    def verdicts(self) -> pd.DataFrame:
        """Probe x pair table of ``"score [low, high] verdict"`` strings (a quick look in a terminal)."""
        cells = {run.label: {name: f"{r.score.format()} {r.verdict}" for name, r in run.results.items()}
                 for run in self.runs}
        return pd.DataFrame(cells).reindex(self.probes).fillna("not run")

    def overall(self) -> pd.DataFrame:
        """Per audited pair, one overall verdict from the probes it trusts: the probes :attr:`trust` calls
        trusted (every probe without a trust file). ``intact`` if any trusted probe finds the answers still given;
        else ``hidden`` if any trusted probe brings them back; else ``erased``; ``no trusted probe`` when none of
        them ran. Columns ``label``, ``verdict``, ``trusted`` (the probes counted), ``why`` (the meta-evaluation's
        reason for each probe, or that there is none)."""
        trusted = None if self.trust is None else {p for p, why in self.trust["trusted"].items()
                                                   if why.startswith("trusted")}
        rows = []
        for run in self.runs:
            counted = {name: r.verdict for name, r in run.results.items() if trusted is None or name in trusted}
            decisive = {v for v in counted.values() if v != INCONCLUSIVE}
            verdict = next((v for v in ("intact", "hidden", "erased") if v in decisive),
                           INCONCLUSIVE if counted else "no trusted probe")
            if self.trust is None:
                why = "no meta-evaluation given: every probe counts"
            else:
                why = (f"meta-evaluation on {self.trust.get('target')}: "
                       + "; ".join(f"{p} {reason}" for p, reason in self.trust["trusted"].items()))
            rows.append({"label": run.label, "verdict": verdict, "trusted": ", ".join(counted), "why": why})
        return pd.DataFrame(rows, columns=["label", "verdict", "trusted", "why"])

    # ------------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """Every number and the provenance, strict JSON (NaN and infinite values as ``None``)."""
        return _json_safe({"format": AUDIT_FORMAT, "runs": [r.to_dict() for r in self.runs], "trust": self.trust})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        return cls([AuditRun.from_dict(r) for r in data["runs"]], trust=data.get("trust"))

    # ------------------------------------------------------------------------------------------------ figures

    def figure(self, probe: str | None = None) -> go.Figure:
        """``probe``'s figure with every pair side by side (:meth:`Probe.figure`), or, with no probe, the verdict
        overview: probes x pairs, coloured by verdict (:data:`VERDICT_COLOURS`), each cell showing the score and its
        interval (drawn by the function registered for :class:`AuditReport`, :mod:`patchlab.reports.views`).

        Raises:
            PatchlabValueError: no run holds ``probe``, or the probe is not registered in this version.
        """
        if probe is None:
            return super().figure()
        results = [(run.label, run.results[probe]) for run in self.runs if probe in run.results]
        if not results:
            raise PatchlabValueError(f"no result of probe {probe!r} in this report; it holds "
                                     f"{[p for p in self.probes if any(p in r.results for r in self.runs)]}")
        if probe not in PROBES:
            raise PatchlabValueError(f"probe {probe!r} is not registered in this patchlab; cannot draw it")
        return PROBES[probe].figure(results)

    # ------------------------------------------------------------------------------------------------ files

    def html(self) -> str:
        """The report as one self-contained HTML page: the verdict table first, then each probe's description and
        figure, then the provenance (plotly's JavaScript inlined)."""
        sections = []
        for name in self.probes:
            probe = PROBES.get(name)
            results = [(r.label, r.results[name]) for r in self.runs if name in r.results]
            if not results:
                continue
            body = (probe.figure(results).to_html(full_html=False, include_plotlyjs=False,
                                                  config={"displaylogo": False})
                    if probe else "<p>(this probe is not registered in this patchlab version: no figure)</p>")
            about = f"<p>{html.escape(probe.description)}</p>" if probe else ""
            sections.append(f'<section id="{html.escape(name)}"><h2>{html.escape(probe_title(name))}</h2>'
                            f'{about}{body}</section>')
        return _PAGE.format(js=plotly.offline.get_plotlyjs(), css=_CSS,
                            summary=self._summary_html() + self._overall_html(),
                            table=self._table_html(), sections="\n".join(sections),
                            provenance=self._provenance_html())

    def figures(self) -> dict[str, str]:
        """The report's one page, ``audit``: :meth:`html` (self-contained, so it needs no plotly.js beside it)."""
        return {self.kind: self.html()}

    # ------------------------------------------------------------------------------------------------ HTML parts

    def _overall_html(self) -> str:
        """The overall verdicts (:meth:`overall`) and why those probes are trusted."""
        items = "".join(f"<li><b>{html.escape(r.label)}</b>: <b>{html.escape(r.verdict)}</b> (from "
                        f"{html.escape(r.trusted or 'no probe')})</li>" for r in self.overall().itertuples())
        if self.trust is None:
            why = "<p>No meta-evaluation given: every probe counts.</p>"
        else:
            reasons = "".join(f"<li>{html.escape(p)}: {html.escape(reason)}</li>"
                              for p, reason in self.trust["trusted"].items())
            why = (f"<p>Which probes to believe, from a meta-evaluation on a zoo for "
                   f"{html.escape(str(self.trust.get('target')))} (<code>{html.escape(self.trust.get('command', ''))}"
                   f"</code>):</p><ul>{reasons}</ul>")
        return f"<h2>Overall verdict</h2><ul>{items}</ul>{why}"

    def _summary_html(self) -> str:
        items = []
        for run in self.runs:
            prov = run.provenance
            n_q, n_u = len(prov.get("questions", [])), len(prov.get("unrelated") or [])
            skipped = "".join(f"; <i>{html.escape(p)} not run: {html.escape(why)}</i>"
                              for p, why in run.skipped.items())
            items.append(f"<li><b>{html.escape(run.label)}</b>: {n_q} target questions, {n_u} unrelated questions, "
                         f"retain model: {'yes' if prov.get('checkpoints', {}).get('retain') else 'no'}{skipped}"
                         f"<br>{html.escape(run.overall())}</li>")
        return f"<ul>{''.join(items)}</ul>"

    def _table_html(self) -> str:
        head = "".join(f'<th colspan="2">{html.escape(label)}</th>' for label in self.labels)
        rows = [row for row in (self._accuracy_row(),) if row]
        for name in self.probes:
            first = next((run.results[name] for run in self.runs if name in run.results), None)
            meaning = html.escape(first.meaning) if first else ""
            cells = []
            for run in self.runs:
                r = run.results.get(name)
                if r is None:
                    cells.append(f'<td colspan="2" class="na">not run{_why(run.skipped.get(name))}</td>')
                    continue
                note = (f'<div class="note">{html.escape(r.note)}</div>' if r.note else "") + (
                    f'<div class="note"><b>why {r.verdict}:</b> {html.escape(r.reason)}</div>' if r.reason else "")
                cells.append(f'<td class="score">{html.escape(r.score.format())}{note}</td>'
                             f'<td class="verdict" style="background:{VERDICT_COLOURS[r.verdict]}">{r.verdict}</td>')
            rows.append(f'<tr><th class="probe"><a href="#{html.escape(name)}">{html.escape(probe_title(name))}</a></th>'
                        f'<td class="meaning">{meaning}</td>{"".join(cells)}</tr>')
        rules = "".join(f"<li><b>{html.escape(probe_title(name))}</b>: {html.escape(rule)}</li>"
                        for name, rule in self._rules().items())
        return (f'<table class="verdicts"><thead><tr><th>probe</th><th>what the score means</th>{head}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table><p class="caption">Scores: value [95% bootstrap interval over '
                f'questions].</p><details open><summary>Verdict rules</summary><ul class="rules">{rules}</ul>'
                f'</details>')

    def _rules(self) -> dict[str, str]:
        """Probe -> its verdict rule (the first run's wording: it depends only on the settings)."""
        return {name: next(run.results[name].rule for run in self.runs if name in run.results)
                for name in self.probes if any(name in run.results for run in self.runs)}

    def _accuracy_row(self) -> str:
        """A context row: each pair's greedy target accuracy, vanilla -> unlearned (from any probe that scored it)."""
        cells, found = [], False
        for run in self.runs:
            base = next((r.details for r in run.results.values() if "unlearned" in r.details), None)
            if base is None:
                cells.append('<td colspan="2" class="na">-</td>')
                continue
            found = True
            cells.append(f'<td colspan="2" class="score">{base["vanilla"]["accuracy"]:.2f} &rarr; '
                         f'{base["unlearned"]["accuracy"]:.2f}</td>')
        if not found:
            return ""
        return ('<tr class="context"><th class="probe">target accuracy</th><td class="meaning">greedy answers that '
                'give the expected answer (normalised containment; ROUGE-L recall for sentences), vanilla &rarr; '
                'unlearned model (0-1)</td>' + "".join(cells) + "</tr>")

    def _provenance_html(self) -> str:
        blocks = []
        for run in self.runs:
            prov = run.provenance
            rows = "".join(f"<tr><td>{html.escape(role)}</td><td>{html.escape(str(rec.get('source')))}</td>"
                           f"<td><code>{html.escape(str(rec.get('weights')))}</code></td></tr>"
                           for role, rec in prov.get("checkpoints", {}).items() if rec)
            settings = html.escape(json.dumps(prov.get("settings", {}), indent=1, default=str))
            env = html.escape(", ".join(f"{k} {v}" for k, v in prov.get("environment", {}).items()))
            blocks.append(f"<h3>{html.escape(run.label)}</h3><table class='prov'><tr><th>checkpoint</th><th>source"
                          f"</th><th>weights (xxh3-128)</th></tr>{rows}</table><p>{env}</p>"
                          f"<details><summary>settings</summary><pre>{settings}</pre></details>")
        return "".join(blocks)


def probe_title(name: str) -> str:
    """A probe's display title (its registry entry's), or its name when it is not registered."""
    return PROBES[name].title if name in PROBES else name


def _why(reason: str | None) -> str:
    return f": {html.escape(reason)}" if reason else ""


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats as ``None`` (strict JSON), recursively."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px 40px; color: #222;
       max-width: 1400px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table.verdicts { border-collapse: collapse; margin: 12px 0; }
table.verdicts th, table.verdicts td { border: 1px solid #ccc; padding: 6px 10px; vertical-align: top; }
table.verdicts thead th { background: #f3f3f3; }
th.probe { text-align: left; white-space: nowrap; } th.probe a { color: #222; }
td.meaning { min-width: 280px; max-width: 420px; font-size: 14px; }
td.score { font-variant-numeric: tabular-nums; white-space: nowrap; text-align: right; }
.note { color: #666; font-size: 12px; white-space: normal; max-width: 190px; margin-left: auto; }
td.verdict { color: white; font-weight: 600; text-align: center; vertical-align: middle; }
.caption { color: #555; font-size: 13px; margin-top: 0; } ul.rules { font-size: 13px; color: #444; }
td.na { color: #999; text-align: center; } tr.context td, tr.context th { background: #fafafa; }
table.prov { border-collapse: collapse; font-size: 13px; }
table.prov td, table.prov th { border: 1px solid #ddd; padding: 3px 8px; }
pre { font-size: 12px; background: #f7f7f7; padding: 8px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Residual-knowledge audit</title>
<style>{css}</style>
<script type="text/javascript">{js}</script>
</head><body>
<h1>Residual-knowledge audit</h1>
<p>Did unlearning erase the knowledge, or only hide it? Each probe below tries to bring the forgotten answers back.
<b>erased</b>: gone, and the probe does not bring it back; <b>hidden</b>: gone from the output, but the probe brings
it back; <b>intact</b>: the unlearned model still answers; <b>inconclusive</b>: the probe cannot decide on this pair
(the reason is given beside it).</p>
{summary}
<h2>Verdicts</h2>
{table}
{sections}
<h2>Provenance</h2>
{provenance}
</body></html>
"""
