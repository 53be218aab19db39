"""Every plotly figure patchlab draws, in one module (:mod:`patchlab.reports.views` calls these functions).

* :func:`window_heatmap` / :func:`window_heatmaps`: a score (KRS or any recovery metric) per restored component and
  layer window, one heatmap or one small panel per question, on a diverging colour scale centred on 0;
* :func:`layer_module_heatmap`: a layer x module-type table (parameter diffs), linear or log colour scale;
* :func:`density_bars` / :func:`density_heatmaps`: WAGLE's mask-density figures, methods side by side;
* :func:`sweep_scatter`: the method sweep's target vs unrelated BLEU (Hong et al., Fig. 2);
* :func:`verdict_grid`: the audit's overview, a verdict per probe and audited pair;
* :func:`curve` / :func:`colour`: the audit probes' curves with bootstrap bands, one colour per audited pair and
  curve role (unlearned, vanilla, retain...).

Hover values are rounded (:data:`HOVER_DIGITS` decimals, or 3 significant digits on log scales); titles count
with :func:`plural`.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.colors
import plotly.express as px
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots

from patchlab.errors import PatchlabValueError
from patchlab.pair.arch import module_order
from patchlab.patching.windows import window_label

if TYPE_CHECKING:
    from patchlab.probes.base import Interval

#: Red (negative: the restoration made things worse) - white (0) - blue (positive), ColorBrewer RdBu.
DIVERGING = plotly.colors.diverging.RdBu
#: Decimals of the values hovered over and written into heatmap cells.
HOVER_DIGITS, CELL_DIGITS = 3, 2
#: Height in pixels of one heatmap row, and of a panel's title and axis margins.
ROW_PX, PANEL_PX = 28, 90
#: What a density figure shows for weights a method does not score (e.g. wanda's norms), instead of 0.
NOT_SCORED = "not scored"
#: Characters of a question kept in a panel title.
PANEL_TITLE_CHARS = 70
#: Questions drawn by :func:`question_heatmap` (beyond it: the highest and lowest half each), the height in
#: pixels of one question's row, the characters of a question kept in its tick label, and the width of hover lines.
QUESTION_ROWS, QUESTION_PX, QUESTION_LABEL_CHARS, HOVER_WRAP_CHARS = 40, 22, 48, 80


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 question"``, ``"2 questions"``, ``"0 questions"`` (``plural_form`` for irregular nouns)."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def _check_windows(windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    windows = [tuple(int(v) for v in w) for w in windows]
    if not windows or any(len(w) != 2 or w[1] <= w[0] for w in windows):
        raise PatchlabValueError(f"windows must be a non-empty list of half-open (start, stop) layer ranges, "
                                 f"got {windows!r}")
    return windows


def _colour_bound(values: np.ndarray) -> float:
    """Half-width of a colour range centred on 0 that holds every finite value and at least [-1, 1]."""
    finite = np.abs(values[np.isfinite(values)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def _window_trace(z: np.ndarray, rows: Sequence[str], labels: list[str], value_name: str, *, show_values: bool,
                  panel: str | None = None, hover: Sequence[Sequence[str]] | None = None) -> go.Heatmap:
    """One component x window heatmap trace on x positions 0..n-1 (ticks labelled by the caller), coloured by the
    figure's shared ``coloraxis``; ``hover`` replaces each cell's default hover text."""
    hover = hover or [[f"{row}<br>layers {label}<br>{value_name} {v:.{HOVER_DIGITS}f}" for label, v in zip(labels, line)]
                      for row, line in zip(rows, z)]
    return go.Heatmap(z=z, x=list(range(len(labels))), y=list(rows), text=hover, coloraxis="coloraxis",
                      hovertemplate="%{text}<extra>" + (panel or "") + "</extra>",
                      texttemplate=f"%{{z:.{CELL_DIGITS}f}}" if show_values else None)


def _coloraxis(bound: float, value_name: str) -> dict:
    return {"colorscale": DIVERGING, "cmin": -bound, "cmax": bound, "cmid": 0.0, "colorbar": {"title": value_name}}


def window_heatmap(values: Float[np.ndarray, "row window"], rows: Sequence[str], windows: Sequence[tuple[int, int]],
                   *, title: str | None = None, value_name: str = "KRS", show_values: bool = True,
                   x_title: str = "layers restored (window)", y_title: str = "restored component") -> go.Figure:
    """A score per restored component (rows, top to bottom) and layer window (columns), e.g. a KRS sweep.

    The colour scale is diverging and centred on 0 (red below, white at 0, blue above; symmetric, at least -1..1),
    so a restoration that made things worse stands out; each cell shows its value (``CELL_DIGITS`` decimals) and
    the x axis the layers of each window (``"0-2"``, ``"1-3"``, ...), one tick per window.

    Args:
        values: ``[n_rows, n_windows]`` scores (NaN cells are left blank).
        rows: a label per row (restored components). windows: half-open ``(start, stop)`` layer ranges.
        title: the figure title (e.g. :func:`krs_title`). value_name: the score's name (colour bar, hover).
        show_values: write the values in the cells.

    Raises:
        PatchlabValueError: ``values`` is not ``[len(rows), len(windows)]``, or a window is not a range.
    """
    windows = _check_windows(windows)
    z = np.asarray(values, dtype=float)
    if z.shape != (len(rows), len(windows)):
        raise PatchlabValueError(f"values must be [rows, windows] = [{len(rows)}, {len(windows)}], got {z.shape}")
    labels = [window_label(w) for w in windows]
    fig = go.Figure(_window_trace(z, rows, labels, value_name, show_values=show_values))
    fig.update_layout(title=title, coloraxis=_coloraxis(_colour_bound(z), value_name),
                      height=max(320, 200 + ROW_PX * 2 * len(rows)))
    fig.update_xaxes(title_text=x_title, tickmode="array", tickvals=list(range(len(labels))), ticktext=labels)
    fig.update_yaxes(title_text=y_title, autorange="reversed", type="category")
    return fig


def window_heatmaps(values: Float[np.ndarray, "panel row window"], rows: Sequence[str],
                    windows: Sequence[tuple[int, int]], panels: Sequence[str], *, title: str | None = None,
                    value_name: str = "KRS", columns: int = 2, show_values: bool = True,
                    x_title: str = "layers restored (window)", numbered: bool = True,
                    hover: Sequence[Sequence[Sequence[str]]] | None = None) -> go.Figure:
    """One small :func:`window_heatmap` panel per question (``panels``: their titles, e.g. the questions), in a grid
    of ``columns`` columns, on one shared diverging colour scale centred on 0.

    Args:
        values: ``[n_panels, n_rows, n_windows]`` scores, e.g. a sweep's per-question KRS.
        numbered: prefix panel titles with ``Q1:``, ``Q2:``, ... (questions); ``False`` for other panels.
        hover: per panel, row and window, the cell's hover text (default: row, layers and value).

    Raises:
        PatchlabValueError: ``values`` is not ``[len(panels), len(rows), len(windows)]``, or ``columns < 1``.
    """
    windows = _check_windows(windows)
    z = np.asarray(values, dtype=float)
    if z.shape != (len(panels), len(rows), len(windows)) or not len(panels):
        raise PatchlabValueError(f"values must be [panels, rows, windows] = [{len(panels)}, {len(rows)}, "
                                 f"{len(windows)}] with at least one panel, got {z.shape}")
    if not isinstance(columns, int) or columns < 1:
        raise PatchlabValueError(f"columns must be a positive integer, got {columns!r}")
    columns = min(columns, len(panels))
    n_rows = math.ceil(len(panels) / columns)
    panel_px = PANEL_PX + ROW_PX * len(rows)
    height = n_rows * panel_px + 120
    names = [_short(f"Q{i + 1}: {p}" if numbered else p) for i, p in enumerate(panels)]
    fig = make_subplots(rows=n_rows, cols=columns, subplot_titles=names, horizontal_spacing=0.06,
                        vertical_spacing=min(0.9 / max(1, n_rows - 1), (PANEL_PX - 20) / height))
    labels = [window_label(w) for w in windows]
    for i, name in enumerate(names):
        fig.add_trace(_window_trace(z[i], rows, labels, value_name, show_values=show_values,
                                    panel=f"Q{i + 1}" if numbered else _short(panels[i], 30),
                                    hover=hover[i] if hover is not None else None),
                      row=i // columns + 1, col=i % columns + 1)
    fig.update_layout(title=title, coloraxis=_coloraxis(_colour_bound(z), value_name), height=height)
    fig.update_annotations(font_size=11)
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels)
    fig.update_xaxes(title_text=x_title, row=n_rows)
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def _short(text: str, limit: int = PANEL_TITLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _plain(text: str) -> str:
    """``text`` safe inside plotly's pseudo-HTML labels: ``<`` and ``>`` escaped, so a question is never read as
    markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _wrapped(text: str, width: int = HOVER_WRAP_CHARS) -> str:
    """``text`` escaped (:func:`_plain`) and broken into hover lines of at most ``width`` characters."""
    return "<br>".join(_plain(line) for line in textwrap.wrap(text, width) or [""])


def ranked_rows(values: Float[np.ndarray, "row column"], shown: int) -> list[np.ndarray]:
    """Row indices ordered by their mean over columns, highest first (rows that are all NaN last, ties in row
    order): every row if there are at most ``shown``, else two blocks, the ``shown // 2`` highest and the
    ``shown - shown // 2`` lowest (still highest first).

    Raises:
        PatchlabValueError: ``shown < 2``.
    """
    if not isinstance(shown, int) or shown < 2:
        raise PatchlabValueError(f"shown must be an integer >= 2, got {shown!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: its mean is NaN, ranked last
        means = np.nanmean(values, axis=1)
    order = np.lexsort((np.arange(len(means)), -np.nan_to_num(means, nan=-np.inf)))
    if len(order) <= shown:
        return [order]
    return [order[:shown // 2], order[len(order) - (shown - shown // 2):]]


def question_heatmap(values: Float[np.ndarray, "component question window"], components: Sequence[str],
                     windows: Sequence[tuple[int, int]], questions: Sequence[str], *, title: str | None = None,
                     value_name: str = "KRS", shown: int = QUESTION_ROWS, show_values: bool = True,
                     x_title: str = "layers restored (window)") -> go.Figure:
    """A per-question sweep as one question x window heatmap per restored component, a dropdown picking the
    component; a page of bounded size whatever the number of questions.

    Questions (rows) are ranked by their mean score over windows for the component shown, highest first, and
    labelled ``Q<k>: <question>`` cut to :data:`QUESTION_LABEL_CHARS` characters; a cell's hover holds the whole
    question, its rank and mean, the window's layers and the score (:data:`HOVER_DIGITS` decimals). With more than
    ``shown`` questions only the ``shown // 2`` highest and the rest of ``shown`` lowest are drawn, in two panels
    (every score stays in the result's per-question table). All panels share one diverging colour scale centred on
    0, with one colour bar. Traces: one per component and panel (at most ``2 * len(components)``); height: at most
    ``shown`` rows of :data:`QUESTION_PX` pixels plus margins.

    Args:
        values: ``[n_components, n_questions, n_windows]`` scores (NaN cells are left blank).
        components: a label per component (the dropdown's entries). windows: half-open ``(start, stop)`` ranges.
        questions: the questions, in the sweep's order (``Q1`` is the first).
        shown: the most questions drawn (>= 2).

    Raises:
        PatchlabValueError: ``values`` is not ``[len(components), len(questions), len(windows)]``, there is no
            component or question, a window is not a range, or ``shown < 2``.
    """
    windows = _check_windows(windows)
    z = np.asarray(values, dtype=float)
    if z.shape != (len(components), len(questions), len(windows)) or not len(components) or not len(questions):
        raise PatchlabValueError(f"values must be [components, questions, windows] = [{len(components)}, "
                                 f"{len(questions)}, {len(windows)}] with at least one of each, got {z.shape}")
    labels = [window_label(w) for w in windows]
    blocks = [ranked_rows(comp, shown) for comp in z]
    n, n_panels = len(questions), len(blocks[0])
    if n_panels == 1:
        fig = go.Figure()
        spans = [f"all {plural(n, 'question')}, highest mean {value_name} first"]
    else:
        top, bottom = len(blocks[0][0]), len(blocks[0][1])
        spans = [f"the {top} highest mean {value_name} of {n:,} questions",
                 f"the {bottom} lowest mean {value_name} (ranks {n - bottom + 1:,}-{n:,})"]
        fig = make_subplots(rows=2, cols=1, subplot_titles=spans, row_heights=[top, bottom], vertical_spacing=0.1)
    y_layout: list[dict] = []
    for c, (name, comp, parts) in enumerate(zip(components, z, blocks)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(comp, axis=1)
        rank = {int(q): r + 1 for r, q in enumerate(np.concatenate(parts))} if n_panels == 1 else \
            {int(q): r + 1 for r, q in enumerate(parts[0])} | {int(q): n - len(parts[1]) + r + 1
                                                                for r, q in enumerate(parts[1])}
        ticks = {}
        for panel, rows in enumerate(parts):
            head = [f"Q{q + 1}: {_wrapped(questions[q])}<br>rank {rank[int(q)]:,} of {n:,} by mean {value_name} "
                    f"({means[q]:.{HOVER_DIGITS}f})" for q in rows]
            hover = [[f"{h}<br>{name}, layers {label}<br>{value_name} {v:.{HOVER_DIGITS}f}"
                      for label, v in zip(labels, comp[q])] for h, q in zip(head, rows)]
            trace = go.Heatmap(z=comp[rows], x=list(range(len(labels))), y=list(range(len(rows))), text=hover,
                               coloraxis="coloraxis", hovertemplate="%{text}<extra>" + _plain(name) + "</extra>",
                               texttemplate=f"%{{z:.{CELL_DIGITS}f}}" if show_values else None, hoverongaps=False,
                               visible=c == 0, name=name)
            fig.add_trace(trace, **({"row": panel + 1, "col": 1} if n_panels > 1 else {}))
            axis = "yaxis" if panel == 0 else f"yaxis{panel + 1}"
            ticks[f"{axis}.ticktext"] = [_plain(_short(f"Q{q + 1}: {questions[q]}", QUESTION_LABEL_CHARS))
                                         for q in rows]
            ticks[f"{axis}.tickvals"] = list(range(len(rows)))
        y_layout.append(ticks)
    per_component = len(blocks[0])
    buttons = [{"label": name, "method": "update",
                "args": [{"visible": [i // per_component == c for i in range(len(fig.data))]}, y_layout[c]]}
               for c, name in enumerate(components)]
    rows_drawn = sum(len(b) for b in blocks[0])
    fig.update_layout(
        title=title, coloraxis=_coloraxis(_colour_bound(z), value_name), height=260 + QUESTION_PX * rows_drawn,
        margin={"l": 20, "t": 130},
        updatemenus=[{"buttons": buttons, "active": 0, "x": 0, "xanchor": "left", "y": 1.0, "yanchor": "bottom",
                      "pad": {"b": 30 if n_panels > 1 else 8}}])
    fig.add_annotation(text="restored component:", x=0, xref="paper", xanchor="right", y=1.0, yref="paper",
                       yanchor="bottom", yshift=(34 if n_panels > 1 else 12), showarrow=False)
    fig.update_layout(y_layout[0])
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, title_text=x_title)
    fig.update_yaxes(autorange="reversed", tickmode="array", automargin=True)
    fig.update_yaxes(title_text=f"question ({spans[0]})" if n_panels == 1 else "question")
    return fig


def krs_title(n_questions: int, *, aggregate: str = "mean", per_question: bool = False, window: int | None = None,
              n_tokens: int | None = None, vanilla: str | None = None, unlearned: str | None = None,
              metric: str = "Knowledge Recovery Score") -> str:
    """A sweep heatmap's title: ``"Knowledge Recovery Score, mean over 1 question (window 5, 30 tokens)"``, or
    ``"Knowledge Recovery Score per question (4 questions, window 5, 30 tokens)"`` with ``per_question``, and a
    second line naming the models (``unlearned: ... vs vanilla: ...``) when given."""
    details = [f"window {window}" if window is not None else "",
               plural(n_tokens, "token") if n_tokens is not None else ""]
    if per_question:
        head, details = f"{metric} per question", [plural(n_questions, "question"), *details]
    else:
        head = f"{metric}, {aggregate} over {plural(n_questions, 'question')}"
    details_text = ", ".join(d for d in details if d)
    return with_subtitle(head + (f" ({details_text})" if details_text else ""), models_line(vanilla, unlearned))


def models_line(vanilla: str | None, unlearned: str | None) -> str:
    """``"unlearned: <name> vs vanilla: <name>"`` for the names given (``""`` for none)."""
    return " vs ".join(f"{who}: {name}" for who, name in (("unlearned", unlearned), ("vanilla", vanilla)) if name)


def with_subtitle(title: str, subtitle: str | None) -> str:
    """``title`` with ``subtitle`` as a smaller second line (plotly's ``<br><sup>``), if there is one."""
    return title + (f"<br><sup>{subtitle}</sup>" if subtitle else "")


# ------------------------------------------------------------------------------------------ layer x module tables


def _cell(v: float, log: bool, decimals: int) -> str:
    """A cell's text: scientific with 3 significant digits on a log scale (``"1.23e-08"``, so magnitudes compare
    at a glance; ``"0"`` for zero), else ``decimals`` decimals; ``""`` for NaN."""
    if not np.isfinite(v):
        return ""
    if log:
        return "0" if v == 0 else f"{v:.2e}"
    return f"{v:.{decimals}f}"


def layer_module_heatmap(table: pd.DataFrame, *, value_name: str, title: str | None = None, log: bool = False,
                         decimals: int = HOVER_DIGITS, colorscale: str = "Viridis") -> go.Figure:
    """A layer (rows) x module type (columns) heatmap of ``table`` (index: layers, columns: module types).

    ``log=True`` colours by ``log10`` of the values, so quantities spanning orders of magnitude (``1 - cos`` of
    1e-9..1e-5, relative L2 changes) separate; its colour bar is labelled in powers of ten, zeros (unchanged) are
    left blank. Cells and hover show the values themselves: with 3 significant digits on a log scale, else with
    ``decimals`` decimals.

    Raises:
        PatchlabValueError: ``log=True`` with a negative value.
    """
    raw = table.to_numpy(dtype=float)
    text = [[_cell(v, log, decimals) for v in row] for row in raw]
    colorbar: dict = {"title": value_name}
    z = raw
    if log:
        if (raw < 0).any():
            raise PatchlabValueError(f"a log colour scale needs values >= 0; {value_name} has negative ones")
        with np.errstate(divide="ignore"):
            z = np.where(raw > 0, np.log10(np.where(raw > 0, raw, 1.0)), np.nan)
        finite = z[np.isfinite(z)]
        if finite.size:
            ticks = list(range(math.floor(finite.min()), math.ceil(finite.max()) + 1))
            colorbar.update(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
    fig = go.Figure(go.Heatmap(z=z, x=list(table.columns), y=[int(i) for i in table.index], text=text,
                               texttemplate="%{text}", colorscale=colorscale, colorbar=colorbar, hoverongaps=False,
                               hovertemplate="layer %{y}<br>%{x}<br>" + value_name + " %{text}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="module", yaxis_title="layer",
                      height=max(360, 200 + ROW_PX * len(table.index)))
    fig.update_yaxes(tickmode="array", tickvals=[int(i) for i in table.index])
    return fig


# ------------------------------------------------------------------------------------------------- densities


def _unscored(frame: pd.DataFrame) -> pd.Series:
    """Rows of a density frame where the method scored no weight (``scored == 0``; none in frames without a
    ``scored`` column, saved before it existed)."""
    return frame["scored"].eq(0) if "scored" in frame else pd.Series(False, index=frame.index)


def density_bars(per_module: pd.DataFrame, methods: Sequence[str], *, subtitle: str | None = None) -> go.Figure:
    """Grouped bars of the density (0..1) per module type, one bar per method (columns ``method``, ``module``,
    ``selected``, ``total``, ``scored``, ``density``, as :func:`patchlab.unlearning.attribution.module_density`
    gives); a module type the method did not score reads "not scored" (no bar), not 0. ``subtitle``: the title's
    second line (the model and ratio)."""
    order = module_order(per_module["module"])
    bars = go.Figure()
    for method in methods:
        part = per_module[per_module["method"] == method].set_index("module").reindex(order)
        unscored = _unscored(part).to_numpy()
        bars.add_bar(name=method, x=order, y=part["density"].where(~unscored, 0.0),
                     text=np.where(unscored, NOT_SCORED, ""), textposition="outside", cliponaxis=False,
                     textangle=-90, constraintext="none", textfont={"size": 12},
                     customdata=np.stack([part["selected"], part["total"],
                                          np.where(unscored, f" ({NOT_SCORED})", "")], axis=1),
                     hovertemplate=f"%{{x}}: %{{y:.{HOVER_DIGITS}f}} (%{{customdata[0]:,}} of %{{customdata[1]:,}} "
                                   "weights)%{customdata[2]}")
    bars.update_layout(barmode="group", title=with_subtitle("Density of selected weights per module type", subtitle),
                       xaxis_title="module", yaxis_title="fraction selected", yaxis_range=[0, 1.05])
    return bars


def density_heatmaps(table: pd.DataFrame, methods: Sequence[str], *, subtitle: str | None = None) -> go.Figure:
    """One layer x module-type heatmap of the density per method (decoder layers only), colours 0..1 shared, one
    colour bar ("fraction selected"), each cell showing its value (:data:`CELL_DIGITS` decimals); a cell the method
    did not score is blank and reads "not scored", not 0. ``subtitle``: the title's second line.

    ``table``: columns ``method``, ``module``, ``layer`` (NA outside the decoder layers), ``density`` and, when
    known, ``scored`` (weights the method scored).

    Raises:
        PatchlabValueError: no decoder-layer row in ``table``.
    """
    layered = table[table["layer"].notna()]
    if layered.empty:
        raise PatchlabValueError("the density frames have no decoder-layer parameter")
    order = module_order(layered["module"])
    heat = make_subplots(rows=1, cols=len(methods), subplot_titles=list(methods), shared_yaxes=True)
    layered = layered.assign(unscored=_unscored(layered))
    for col, method in enumerate(methods, start=1):
        part = layered[layered["method"] == method]
        grid = part.pivot_table(index="layer", columns="module", values="density", aggfunc="first").reindex(
            columns=order)
        unscored = part.pivot_table(index="layer", columns="module", values="unscored", aggfunc="first").reindex(
            index=grid.index, columns=order).fillna(False).to_numpy(dtype=bool)
        z = np.where(unscored, np.nan, grid.to_numpy(dtype=float))
        text = [[NOT_SCORED.replace(" ", "<br>") if off else _cell(v, False, CELL_DIGITS) for v, off in zip(row, offs)]
                for row, offs in zip(z, unscored)]
        hover = [[NOT_SCORED if off else _cell(v, False, HOVER_DIGITS) for v, off in zip(row, offs)]
                 for row, offs in zip(z, unscored)]
        heat.add_trace(go.Heatmap(z=z, x=list(grid.columns), y=[int(i) for i in grid.index], zmin=0, zmax=1,
                                  colorscale="Viridis", showscale=col == len(methods), text=text,
                                  texttemplate="%{text}", textfont={"size": 10}, customdata=hover, hoverongaps=True,
                                  colorbar={"title": "fraction<br>selected"},
                                  hovertemplate=f"layer %{{y}}, %{{x}}: %{{customdata}}<extra>{method}</extra>"),
                       row=1, col=col)
    heat.update_layout(title=with_subtitle("Density of selected weights per layer and module type", subtitle),
                       height=max(420, 220 + ROW_PX * layered["layer"].nunique()))
    heat.update_xaxes(title_text="module")
    heat.update_yaxes(title_text="layer", row=1, col=1)
    return heat


# ------------------------------------------------------------------------------------------------- behaviour


def behavior_scores(table: pd.DataFrame, title: str) -> go.Figure:
    """Per-question behavioural scores: BLEU (0-100, left) and ROUGE-L (0-1, right), one point per question, target
    and unrelated sets side by side; hover shows the question, both answers and the rounded scores.

    ``table``: one row per question with ``set``, ``question``, ``before``, ``after``, ``bleu``, ``rouge_l`` (as
    :class:`patchlab.analysis.behavior.BehaviorResult` holds).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=["BLEU (after vs before, 0-100)",
                                                        "ROUGE-L F1 (after vs before, 0-1)"])
    colours = px.colors.qualitative.Plotly
    for col, (metric, digits) in enumerate((("bleu", 1), ("rouge_l", HOVER_DIGITS)), start=1):
        for i, (name, part) in enumerate(table.groupby("set", sort=False)):
            n = len(part)
            fig.add_trace(go.Box(
                y=part[metric], x=[f"{name} ({plural(n, 'question')})"] * n, name=name, boxpoints="all", boxmean=True,
                jitter=0.5, pointpos=0, marker_color=colours[i % len(colours)], showlegend=col == 1,
                legendgroup=name, customdata=part[["question", "before", "after"]].to_numpy(),
                hovertemplate=f"%{{customdata[0]}}<br>before: %{{customdata[1]}}<br>after: %{{customdata[2]}}"
                              f"<br>{metric} %{{y:.{digits}f}}<extra>{name}</extra>"), row=1, col=col)
    fig.update_yaxes(range=[-3, 103], row=1, col=1)
    fig.update_yaxes(range=[-0.03, 1.03], row=1, col=2)
    fig.update_layout(title=title, height=520)
    return fig


# ---------------------------------------------------------------------------------------------- method sweep

#: The method sweep's hover columns and their formats (BLEU 0-100 to 1 decimal, ROUGE-L 0-1 to 3).
_SWEEP_HOVER = {"target_bleu": ":.1f", "unrelated_bleu": ":.1f", "strength": True, "settings": True,
                "target_rouge_l": f":.{HOVER_DIGITS}f", "unrelated_rouge_l": f":.{HOVER_DIGITS}f"}


def sweep_scatter(frame: pd.DataFrame, title: str) -> go.Figure:
    """Target BLEU (x) against unrelated BLEU (y) per run, coloured by method, each method's strengths joined
    weakest to strongest and each point labelled by its strength (0, 1, ...; Hong et al., Fig. 2). ``frame``: one
    row per run with ``method``, ``strength``, ``settings``, ``target_bleu``, ``unrelated_bleu`` (0-100),
    ``target_rouge_l``, ``unrelated_rouge_l`` (0-1)."""
    frame = frame.sort_values("strength", kind="stable")  # methods keep their first-seen order
    fig = px.line(frame, x="target_bleu", y="unrelated_bleu", color="method", symbol="method", markers=True,
                  hover_data=_SWEEP_HOVER, title=title,
                  labels={"target_bleu": "target QA BLEU (after vs before, 0-100)",
                          "unrelated_bleu": "unrelated QA BLEU (after vs before, 0-100)"})
    fig.update_traces(marker={"size": 11}, mode="lines+markers+text", textposition="top right",
                      textfont={"size": 13}, cliponaxis=False)
    for trace in fig.data:  # each point labelled by its strength (customdata[0], as _SWEEP_HOVER orders it)
        trace.text = [f"{int(v)}" for v in trace.customdata[:, 0]]
        trace.textfont.color = trace.line.color
    fig.update_layout(legend_title_text="method<br><sup>point labels: strength (0 = weakest)</sup>")
    fig.update_xaxes(range=[-3, 106])
    fig.update_yaxes(range=[-3, 106])
    return fig


# --------------------------------------------------------------------------------------------------- audit


def verdict_grid(cells: Sequence[Sequence[tuple[str, str] | None]], probes: Sequence[str], pairs: Sequence[str],
                 colours: dict[str, str], title: str) -> go.Figure:
    """A probe (rows, top to bottom) x audited pair (columns) grid, each cell coloured by its verdict and showing
    its text (e.g. the verdict and the score with its interval); ``None`` cells read "not run".

    Args:
        cells: per probe, per pair, ``(verdict, text)`` or ``None``.
        colours: verdict -> colour, in the verdicts' order (one band of the discrete colour scale each).

    Raises:
        PatchlabValueError: a cell's verdict has no colour.
    """
    code = {v: i for i, v in enumerate(colours)}
    for row in cells:
        for cell in row:
            if cell is not None and cell[0] not in code:
                raise PatchlabValueError(f"verdict {cell[0]!r} has no colour; known: {', '.join(colours)}")
    z = [[code[c[0]] if c else None for c in row] for row in cells]
    text = [[c[1] if c else "not run" for c in row] for row in cells]
    n = len(colours)
    scale = [[stop, colour] for i, colour in enumerate(colours.values()) for stop in (i / n, (i + 1) / n)]
    fig = go.Figure(go.Heatmap(z=z, x=list(pairs), y=list(probes), text=text, texttemplate="%{text}",
                               hovertemplate="%{y} on %{x}:<br>%{text}<extra></extra>", colorscale=scale,
                               zmin=-0.5, zmax=n - 0.5, showscale=False, xgap=3, ygap=3))
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, xaxis={"side": "top"},
                      height=120 + 70 * len(probes))
    return fig


# ------------------------------------------------------------------------- curves of several audited pairs --

#: One colour per audited pair and curve role in the audit's figures.
PAIR_PALETTE = plotly.colors.qualitative.D3


def colour(i: int, alpha: float = 1.0) -> str:
    """The ``i``-th pair's colour as ``rgba(...)``."""
    r, g, b = plotly.colors.hex_to_rgb(PAIR_PALETTE[i % len(PAIR_PALETTE)])
    return f"rgba({r},{g},{b},{alpha})"


def curve(x: Sequence, intervals: Sequence[Interval], *, name: str, index: int, dash: str = "solid",
          role: int = 0, roles: int = 1, hover: Sequence[str] | None = None, group: str | None = None,
          showlegend: bool = True) -> list[go.Scatter]:
    """A line through the interval values with a shaded band between their bounds (the band is skipped where a
    bound is NaN). ``hover``: one extra line of hover text per point.

    Colour: one per audited pair (``index``) and curve ``role`` (e.g. unlearned / vanilla / retain) among the
    pair's ``roles``, :func:`colour` ``index * roles + role``, so curves differ by colour, not only by ``dash``."""
    if not 0 <= role < roles:
        raise PatchlabValueError(f"role must be in 0..{roles - 1}, got {role!r}")
    index = index * roles + role
    x = list(x)
    values = [iv.value for iv in intervals]
    text = [f"{name}<br>{iv.format(3)}" + (f"<br>{h}" if hover else "")
            for iv, h in zip(intervals, hover or [""] * len(x))]
    band = go.Scatter(x=x + x[::-1], y=[iv.high for iv in intervals] + [iv.low for iv in intervals][::-1],
                      mode="lines", fill="toself", fillcolor=colour(index, 0.15), line={"width": 0}, hoverinfo="skip",
                      showlegend=False, legendgroup=group or name)
    line = go.Scatter(x=x, y=values, mode="lines+markers", name=name, legendgroup=group or name,
                      line={"color": colour(index), "dash": dash}, marker={"size": 8}, text=text,
                      hovertemplate="%{text}<extra></extra>", showlegend=showlegend)
    return [band, line]


#: Colours of the meta-evaluation pools: models that know the target (P) and models that never saw it (N).
POOL_COLOURS = {"P": "#d73027", "N": "#1a9850"}


def pool_histograms(pools: Mapping[str, Mapping[str, Sequence[float]]], *, title: str, bins: int = 20) -> go.Figure:
    """One histogram panel per probe (``pools``: probe -> ``{"P": readings, "N": readings}``), P and N overlaid on
    the same ``bins + 1`` bins of width ``1 / bins`` centred on 0, 1/bins, ..., 1, so readings of exactly 0 or 1 (the
    common ends) fall inside a bin (readings outside [0, 1] are clipped into the end bins)."""
    if not pools:
        raise PatchlabValueError("pool_histograms needs at least one probe")
    names = list(pools)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    half = 0.5 / bins
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=0.5 / max(rows, 1) if rows > 1 else 0.1)
    for i, name in enumerate(names):
        for pool, colour_ in POOL_COLOURS.items():
            values = np.clip(np.asarray(pools[name].get(pool, []), float), 0.0, 1.0)
            fig.add_trace(go.Histogram(x=values, name=f"{pool} ({'knows' if pool == 'P' else 'never saw'})",
                                       legendgroup=pool, showlegend=i == 0, marker_color=colour_, opacity=0.6,
                                       xbins={"start": -half, "end": 1.0 + half, "size": 2 * half}),
                          row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(range=[-half, 1.0 + half], title_text="knowledge reading (higher = knows)")
    fig.update_yaxes(title_text="models")
    fig.update_layout(barmode="overlay", title=title, height=320 * rows + 80)
    return fig
