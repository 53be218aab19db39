"""How each result type and each audit probe is drawn: the figure functions that
:meth:`patchlab.results.Result.figure` and the audit report look up (:func:`patchlab.results.register_figure`),
built from the plotly pieces of :mod:`patchlab.reports.figures`. Registered when this module is imported
(``import patchlab`` does)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from patchlab.analysis.behavior import METRICS, SETS, BehaviorResult
from patchlab.analysis.method_sweep import SweepResult
from patchlab.analysis.paramdiff import LOG_METRICS, METRIC_LABELS, ParamDiff
from patchlab.meta_evaluation import MetaEvalResult
from patchlab.patching.result import PatchComparison, PatchResult
from patchlab.probes.base import VERDICTS, Interval, ProbeResult
from patchlab.probes.logit_lens import MEASURES
from patchlab.probes.report import VERDICT_COLOURS, AuditReport, probe_title
from patchlab.probes.scoring import SCORES
from patchlab.provenance import short_name
from patchlab.reports import figures
from patchlab.reports.figures import colour, curve
from patchlab.results import model_names, register_figure
from patchlab.unlearning.density import DensityReport

# ------------------------------------------------------------------------------------------------ results


@register_figure(PatchResult)
def patch_result(result: PatchResult, title: str | None = None, *, aggregate: str = "mean",
                 per_question: bool = False) -> go.Figure:
    """:meth:`PatchResult.figure <patchlab.patching.result.PatchResult.figure>`: the component x window heatmap, or
    the ranked question x window heatmap of one component at a time
    (:func:`~patchlab.reports.figures.question_heatmap`)."""
    values = result.aggregated(aggregate)
    title = title or _patch_title(result, aggregate, per_question)
    if per_question:
        stacked = np.stack([result.per_question[c] for c in result.components])
        return figures.question_heatmap(stacked, result.components, result.windows, result.questions, title=title,
                                        value_name=result.value_name)
    return figures.window_heatmap(np.stack([values[c] for c in result.components]), result.components,
                                  result.windows, title=title, value_name=result.value_name)


def _patch_title(result: PatchResult, aggregate: str, per_question: bool) -> str:
    vanilla, unlearned = result.model_names()
    metric = "Knowledge Recovery Score" if result.metric == "krs" else f"{result.metric} recovery"
    return figures.krs_title(len(result.questions), aggregate=aggregate, per_question=per_question,
                             window=result.settings.get("window"), n_tokens=result.settings.get("n_tokens"),
                             vanilla=vanilla, unlearned=unlearned, metric=metric)


@register_figure(PatchComparison)
def patch_comparison(result: PatchComparison, *, aggregate: str = "mean") -> go.Figure:
    """:meth:`PatchComparison.figure <patchlab.patching.result.PatchComparison.figure>`: ``a``, ``b`` and
    ``b - a`` on one diverging scale."""
    a, b = result.a.aggregated(aggregate), result.b.aggregated(aggregate)
    diff = result.difference(aggregate)
    stacked = np.stack([np.stack([v[c] for c in result.a.components]) for v in (a, b, diff)])
    name = result.a.value_name
    panels = [result.labels[0], result.labels[1], f"{result.labels[1]} - {result.labels[0]}"]
    return figures.window_heatmaps(stacked, result.a.components, result.a.windows, panels, columns=1,
                                   value_name=name, numbered=False,
                                   title=f"{name}: {panels[0]} vs {panels[1]} ({aggregate} over "
                                   f"{figures.plural(len(result.a.questions), 'question')})")


@register_figure(ParamDiff)
def param_diff(result: ParamDiff, metric: str = "one_minus_cos") -> go.Figure:
    """:meth:`ParamDiff.figure <patchlab.analysis.paramdiff.ParamDiff.figure>`: the layer x module heatmap of
    ``metric``."""
    table = result.by_layer(metric)
    label = METRIC_LABELS[metric]
    title = figures.with_subtitle(f"Parameter {label} between vanilla and unlearned, per layer and module",
                                  figures.models_line(*model_names(result.provenance)))
    return figures.layer_module_heatmap(table, value_name=label, log=metric in LOG_METRICS, decimals=6,
                                        title=title)


@register_figure(DensityReport)
def density_report_figure(result: DensityReport, view: str = "modules") -> go.Figure:
    """:meth:`DensityReport.figure <patchlab.unlearning.attribution.DensityReport.figure>` (``view`` checked
    there)."""
    if view == "modules":
        return figures.density_bars(result.per_module, result.methods, subtitle=_density_subtitle(result))
    return figures.density_heatmaps(result.table, result.methods, subtitle=_density_subtitle(result))


def _density_subtitle(result: DensityReport) -> str:
    """The density figures' second title line: the scored model and the share of weights selected, e.g.
    ``"model: toy world: vanilla; top 80% of weights selected by each method, over the whole model"``."""
    settings = result.provenance.get("settings", {})
    model = result.provenance.get("model", {}).get("source")
    ratio = settings.get("ratio")
    parts = [f"model: {short_name(model)}" if model else "",
             f"top {ratio:.0%} of weights selected by each method, "
             f"{'within each layer' if settings.get('per_layer') else 'over the whole model'}"
             if ratio is not None else ""]
    return "; ".join(p for p in parts if p)


@register_figure(BehaviorResult)
def behavior_result(result: BehaviorResult, title: str | None = None) -> go.Figure:
    """:meth:`BehaviorResult.figure <patchlab.analysis.behavior.BehaviorResult.figure>`; the default title names
    the models."""
    if title is None:
        names = [name for name in reversed(model_names(result.provenance)) if name is not None]  # unlearned first
        title = "Behavioural test" + (f": {' vs '.join(names)}" if names else "")
    return figures.behavior_scores(result.table, title)


@register_figure(SweepResult)
def sweep_result(result: SweepResult, title: str | None = None) -> go.Figure:
    """:meth:`SweepResult.figure <patchlab.analysis.method_sweep.SweepResult.figure>`."""
    return figures.sweep_scatter(result.to_frame(), title or f"Behavioural test: {result.task}")


@register_figure(AuditReport)
def audit_verdicts(report: AuditReport) -> go.Figure:
    """The audit's overview (:meth:`AuditReport.figure <patchlab.probes.report.AuditReport.figure>` with no
    probe): probes x pairs, coloured by verdict, each cell showing the score and its interval."""
    cells = [[(r.verdict, f"{r.verdict}<br>{r.score.format()}") if r else None
              for r in (run.results.get(name) for run in report.runs)] for name in report.probes]
    return figures.verdict_grid(cells, [probe_title(p) for p in report.probes], report.labels,
                                {v: VERDICT_COLOURS[v] for v in VERDICTS},
                                "Residual-knowledge audit: verdict per probe (score [95% CI])")

# ------------------------------------------------------------------------------------------------ audit probes


@register_figure("krs")
def krs_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """One heatmap per pair (component x layer window, mean KRS on one diverging scale centred on 0: a negative KRS
    means the restoration took the answer further away); hover adds the bootstrap interval."""
    shown = [(label, r) for label, r in results if "sweep" in r.details]
    if not shown:
        return go.Figure(layout={"title": "Knowledge Recovery Score: no pair had a defined KRS"})
    sweep = shown[0][1].details["sweep"]
    components, windows = list(sweep["scores"]), [tuple(w) for w in sweep["windows"]]
    cells = [[[Interval.from_list(v) for v in r.details["intervals"][c]] for c in components] for _, r in shown]
    hover = [[[f"{label}<br>{c}, layers {figures.window_label(w)}<br>KRS {iv.format(3)}" for w, iv in zip(windows, row)]
              for c, row in zip(components, pair_cells)] for (label, _), pair_cells in zip(shown, cells)]
    values = np.array([[[iv.value for iv in row] for row in pair_cells] for pair_cells in cells])
    return figures.window_heatmaps(values, components, windows, [label for label, _ in shown], numbered=False,
                                   columns=len(shown), hover=hover, title="Knowledge Recovery Score: vanilla "
                                   "activations restored inside the unlearned model (mean over questions)")


#: The logit-lens figure's curves per pair: model and dash (each also its own colour).
LENS_ROLES = (("unlearned", "solid"), ("vanilla", "dot"), ("retain", "dash"))


def rank_ticks(highest: float) -> list[int]:
    """Ticks of a log rank axis from 1 to ``highest``: 1, 2, 5, 10, 20, 50, ... (one past ``highest``)."""
    ticks = [1]
    while ticks[-1] < highest:
        ticks.append(ticks[-1] * 5 // 2 if str(ticks[-1]).startswith("2") else ticks[-1] * 2)
    return ticks


@register_figure("logit_lens")
def logit_lens_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """Per layer, the answer's mean lens log-probability (left) and rank (right, log scale): the unlearned model
    solid, the vanilla model dotted, the retain model dashed, per pair, with bootstrap bands."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("answer log-probability under the lens (nats/token)",
                                        "answer rank under the lens (1 = top token)"))
    for i, (label, result) in enumerate(results):
        d = result.details
        for col, measure in enumerate(MEASURES, start=1):
            for role, (who, dash) in enumerate(LENS_ROLES):
                key = f"{who}_{measure}"
                if key not in d:
                    continue
                ivs = [Interval.from_list(v) for v in d[key]]
                for trace in curve(range(len(ivs)), ivs, name=f"{label}: {who}", index=i, dash=dash,
                                   role=role, roles=len(LENS_ROLES),
                                   showlegend=col == 1):
                    fig.add_trace(trace, row=1, col=col)
    fig.update_xaxes(title_text="decoder layer read", dtick=1)
    fig.update_yaxes(title_text="mean log-probability of the answer tokens (nats)", row=1, col=1)
    ranks = [y for trace in fig.data if trace.xaxis == "x2" for y in trace.y if y is not None and np.isfinite(y)]
    fig.update_yaxes(type="log", title_text="median rank of the answer tokens (1 = top token, log scale)",
                     tickvals=(ticks := rank_ticks(max(ranks, default=1.0))), ticktext=[f"{t:,}" for t in ticks],
                     row=1, col=2)
    fig.update_layout(title="Logit lens: each layer's residual stream decoded by the model's own head",
                      legend={"title": "pair: model"})
    return fig


#: The UDS figure's curves per pair: detail key, legend name and dash (each also its own colour).
UDS_ROLES = (("d2_mean", "unlearned -> vanilla (d2)", "solid"), ("d1_mean", "retain -> vanilla (d1)", "dot"))


@register_figure("uds")
def uds_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """Per layer, the drop of the vanilla answer log-probability when that layer's output comes from the retain
    model (dotted, d1) or from the unlearned model (solid, d2), per pair, with bootstrap bands."""
    fig = make_subplots(rows=1, cols=1)
    for i, (label, result) in enumerate(results):
        d = result.details
        if "d1_mean" not in d:
            continue
        layers = list(range(len(d["d1_mean"])))
        for role, (key, who, dash) in enumerate(UDS_ROLES):
            for trace in curve(layers, [Interval.from_list(v) for v in d[key]], name=f"{label}: {who}", index=i,
                               dash=dash, role=role, roles=len(UDS_ROLES)):
                fig.add_trace(trace)
    fig.add_hline(y=results[0][1].details.get("threshold", 0.05) if results else 0.05, line_dash="dash",
                  line_color="grey", annotation_text="knowledge threshold", annotation_position="top left")
    fig.update_xaxes(title_text="patched decoder layer", dtick=1)
    fig.update_yaxes(title_text="drop of the answer log-probability (nats/token)")
    fig.update_layout(title="Unlearning Depth Score: one layer's output patched into the vanilla model",
                      legend={"title": "pair: patched from"})
    return fig


#: The relearning figure's curves per pair: attack and dash (each also its own colour).
RELEARNING_ROLES = (("held_out", "solid"), ("benign", "dash"), ("control", "dot"))


@register_figure("relearning")
def relearning_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """Recovery of accuracy (left) and answer log-probability (right) against fine-tuning steps, per pair: the
    held-out attack solid, the benign one dashed, the retain-model control dotted, with bootstrap bands."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target answer accuracy", "answer log-probability"),
                        horizontal_spacing=0.1)
    for i, (label, result) in enumerate(results):
        d = result.details
        for role, (attack, dash) in enumerate(RELEARNING_ROLES):
            if attack not in d:
                continue
            for col, name in enumerate(SCORES, start=1):
                hover = [f"step {k}: accuracy {a:.2f}, log-prob {lp:.2f} nats/token"
                         for k, a, lp in zip(d["steps"], d[attack]["accuracy"], d[attack]["logprob"])]
                traces = curve(d["steps"], [Interval.from_list(v) for v in d[attack][f"recovery_{name}"]],
                               name=f"{label}: {attack.replace('_', '-')}", index=i, dash=dash, role=role,
                               roles=len(RELEARNING_ROLES), hover=hover,
                               showlegend=col == 1)
                for trace in traces:
                    fig.add_trace(trace, row=1, col=col)
    for col in (1, 2):
        fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=1, col=col)
        fig.add_hline(y=1, line={"color": "grey", "width": 1, "dash": "dot"}, row=1, col=col)
    fig.update_yaxes(title_text="recovery (0 = unlearned, 1 = vanilla)", row=1, col=1)
    fig.update_xaxes(title_text="fine-tuning steps")
    fig.update_layout(title="Relearning attack: held-out half (solid), unrelated QA (dashed), retain-model control "
                            "(dotted)",
                      legend={"title": "pair: attack"}, hovermode="closest")
    return fig


#: The quantization figure's curves per pair: model and dash (each also its own colour).
QUANTIZATION_ROLES = (("unlearned", "solid"), ("vanilla", "dot"))


@register_figure("quantization")
def quantization_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
    """Target accuracy (left) and answer log-probability (right) at full precision and at each bit width: the
    unlearned model solid, the vanilla model dotted, per pair, with bootstrap bands; hover adds the recovery."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("target answer accuracy", "answer log-probability (nats/token)"))
    for i, (label, result) in enumerate(results):
        d = result.details
        x = ["full precision"] + [f"{b} bits" for b in d["bits"]]
        for col, name in enumerate(SCORES, start=1):
            recovered = ["recovery: -"] + [f"recovery: {Interval.from_list(v).format(2)}"
                                           for v in d[f"recovery_{name}"]]
            for r, (role, dash) in enumerate(QUANTIZATION_ROLES):
                ivs = [Interval.from_list(v) for v in d["levels"][role][name]]
                for trace in curve(x, ivs, name=f"{label}: {role}", index=i, dash=dash, role=r,
                                   roles=len(QUANTIZATION_ROLES), showlegend=col == 1,
                                   hover=recovered if role == "unlearned" else None):
                    fig.add_trace(trace, row=1, col=col)
    fig.update_yaxes(range=[-0.05, 1.05], title_text="share answered correctly", row=1, col=1)
    fig.update_xaxes(title_text="weights")
    fig.update_layout(title="Quantization attack: weights quantized (embeddings and LM head in full precision)",
                      legend={"title": "pair: model"})
    return fig


@register_figure("behavior")
def behavior_probe(results: Sequence[tuple[str, ProbeResult]]) -> go.Figure:
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


@register_figure(MetaEvalResult)
def meta_eval_result(result: MetaEvalResult) -> go.Figure:
    """:meth:`MetaEvalResult.figure <patchlab.meta_evaluation.MetaEvalResult.figure>`: each probe's knowledge
    readings, P against N (:func:`~patchlab.reports.figures.pool_histograms`)."""
    return figures.pool_histograms({p: result.pools(p) for p in result.probes},
                                   title=f"Meta-evaluation on {result.target}: knowledge readings, P vs N")
