"""Behavioural test (Hong et al., section 4): do the unlearned model's greedy answers still match the vanilla ones?

Runs :func:`patchlab.analysis.behavior.evaluate` on the target and the unrelated questions: per question, sentence
BLEU (0-100) and token ROUGE-L (0-1) of the unlearned answer against the vanilla answer (at most ``n_tokens``), with
bootstrap intervals over questions. A good unlearning method drives the target scores down and keeps the unrelated
ones up. Behaviour only sees the output, so it can never call knowledge hidden.

Headline: the target BLEU. Verdict: ``intact`` if it is >= 50 (the answers mostly unchanged), else ``erased`` (gone
from the output, which says nothing about the weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from transformers import PreTrainedModel

from patchlab.analysis.behavior import METRICS, SETS, evaluate
from patchlab.reports.figures import colour
from patchlab.probes.base import Interval, Probe, ProbeResult, Question
from patchlab.probes.bootstrap import mean_interval
from patchlab.pair import ModelPair

DEFAULTS: dict[str, Any] = {}
#: Target BLEU (0-100) at or above which the answers count as unchanged.
INTACT_BLEU = 50.0
RULE = f"intact if the target BLEU is >= {INTACT_BLEU:.0f}; else erased (behaviour cannot see hidden knowledge)"


def run(pair: ModelPair, questions: list[Question], *, unrelated: list[Question] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool) -> ProbeResult:
    """The behaviour probe (module docstring)."""
    table = evaluate(pair, [q.question for q in questions], [q.question for q in unrelated or []],
                     max_new_tokens=settings["n_tokens"], template=settings["template"], progress=progress).table
    stats = {s: {m: mean_interval(table.loc[table["set"] == s, m].to_numpy(dtype=float), settings).to_list()
                 for m in METRICS} for s in SETS}
    headline = Interval.from_list(stats["target"]["bleu"])
    return ProbeResult(
        probe="behavior", score=headline, verdict="intact" if headline.value >= INTACT_BLEU else "erased", rule=RULE,
        meaning="target BLEU of the unlearned answers against the vanilla ones (0-100; 100 = unchanged)",
        details={"scores": stats, "rows": table.to_dict("records")})


def figure(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """BLEU (left, 0-100) and ROUGE-L (right, 0-1) of the target and unrelated answers per pair, with bootstrap
    error bars."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("BLEU (0-100)", "ROUGE-L (0-1)"), horizontal_spacing=0.1)
    for i, (label, result) in enumerate(results):
        for col, metric in enumerate(METRICS, start=1):
            ivs = [Interval.from_list(result.details["scores"][s][metric]) for s in SETS]
            fig.add_trace(go.Bar(x=[f"{s} questions" for s in SETS], y=[iv.value for iv in ivs], name=label,
                                 legendgroup=label, marker_color=colour(i), showlegend=col == 1,
                                 text=[f"{label}, {s}<br>{metric} {iv.format(2)}" for s, iv in zip(SETS, ivs)],
                                 hovertemplate="%{text}<extra></extra>", textposition="none",
                                 error_y={"type": "data", "symmetric": False,
                                          "array": [iv.high - iv.value for iv in ivs],
                                          "arrayminus": [iv.value - iv.low for iv in ivs]}),
                          row=1, col=col)
    fig.update_yaxes(range=[0, 105], row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    fig.update_layout(title="Behaviour: unlearned answers against vanilla answers (higher = more unchanged)",
                      barmode="group", legend={"title": "pair"})
    return fig


PROBE = Probe(
    name="behavior", title="Behaviour (BLEU / ROUGE-L)", run=run, figure=figure, defaults=DEFAULTS,
    needs=("unrelated",),
    description="The unlearned model's greedy answers are compared with the vanilla model's: sentence BLEU "
                "(0-100) and token ROUGE-L (0-1), on the target questions (should drop) and on unrelated questions "
                "(should stay high). Behaviour only sees the output: it cannot tell erased from hidden. Error bars "
                "are 95% bootstrap intervals over questions.")
