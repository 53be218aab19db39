"""patchlab.reports.figures: heatmaps a reader can trust at a glance, rounded hovers, plurals; the partial-results
flag of patchlab.results; HTML pages that share one offline plotly.js."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.io import plotlyjs_name, write_html
from patchlab.patching.windows import sliding_windows
from patchlab.reports import figures
from patchlab.results import is_partial, results_record

ROWS = ["coef", "value", "attn"]

#: A hover or cell format that prints a float unrounded: a bare %{z}, %{y}, %{x} or %{customdata[i]}.
UNFORMATTED = re.compile(r"%\{(?:[xyz]|customdata\[\d+\])\}")


def _values(n_windows: int) -> np.ndarray:
    z = np.linspace(-0.3, 0.9, len(ROWS) * n_windows).reshape(len(ROWS), n_windows)
    z[0, 0] = 0.123456789012345  # a long float: must never reach the page unrounded
    return z


def test_window_heatmap_is_diverging_centred_on_zero_with_values_in_cells():
    windows = sliding_windows(6, 5)
    fig = figures.window_heatmap(_values(6), ROWS, windows, title="t")
    axis = fig.layout.coloraxis
    assert axis.cmid == 0 and axis.cmin == -axis.cmax and axis.cmax >= 1
    # red below 0, white at 0, blue above: a negative KRS never looks like 0
    scale = [c for _, c in axis.colorscale]
    assert scale[0] == "rgb(103,0,31)" and scale[len(scale) // 2] == "rgb(247,247,247)" and scale[-1] == "rgb(5,48,97)"
    trace = fig.data[0]
    assert trace.texttemplate == "%{z:.2f}"  # values written in the cells
    assert trace.text[0][0].endswith("KRS 0.123")  # rounded hover
    assert not UNFORMATTED.search(trace.hovertemplate)
    assert fig.layout.yaxis.autorange == "reversed" and list(trace.y) == ROWS


def test_window_axis_shows_layer_spans_on_integer_ticks():
    centred = figures.window_heatmap(_values(6), ROWS, sliding_windows(6, 5))
    assert list(centred.layout.xaxis.ticktext) == ["0-2", "0-3", "0-4", "1-5", "2-5", "3-5"]
    fixed = figures.window_heatmap(_values(4), ROWS, sliding_windows(6, 3, mode="fixed"))
    assert list(fixed.layout.xaxis.ticktext) == ["0-2", "1-3", "2-4", "3-5"]
    assert list(fixed.layout.xaxis.tickvals) == list(fixed.data[0].x) == [0, 1, 2, 3]  # no -0.5 / 0.5 ticks
    single = figures.window_heatmap(_values(6), ROWS, sliding_windows(6, 1, mode="fixed"))
    assert list(single.layout.xaxis.ticktext) == ["0", "1", "2", "3", "4", "5"]


def test_colour_range_holds_values_beyond_one():
    z = _values(6)
    z[1, 1] = -2.5  # a restoration far worse than the unlearned model
    axis = figures.window_heatmap(z, ROWS, sliding_windows(6, 5)).layout.coloraxis
    assert (axis.cmin, axis.cmax) == (-2.5, 2.5)


@pytest.mark.parametrize("shape", [(3, 5), (2, 6)])
def test_window_heatmap_rejects_mismatched_values(shape):
    with pytest.raises(PatchlabValueError, match="values must be"):
        figures.window_heatmap(np.zeros(shape), ROWS, sliding_windows(6, 5))
    with pytest.raises(PatchlabValueError, match="half-open"):
        figures.window_heatmap(np.zeros((3, 1)), ROWS, [(2, 2)])


def test_per_question_panels_share_one_colour_scale():
    questions = ["who wrote the Veltrani Codex ?", "where was it kept ?", "x" * 200]
    values = np.stack([_values(6) + q for q in (0.0, -1.5, 0.05)])
    fig = figures.window_heatmaps(values, ROWS, sliding_windows(6, 5), questions, title="per question")
    assert len(fig.data) == 3 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    for trace, panel in zip(fig.data, values):
        np.testing.assert_array_equal(np.asarray(trace.z), panel)
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["Q1: who wrote the Veltrani Codex ?", "Q2: where was it kept ?"]
    assert titles[2].startswith("Q3: xxx") and len(titles[2]) <= figures.PANEL_TITLE_CHARS
    assert all(list(fig.layout[f"xaxis{i or ''}"].ticktext)[0] == "0-2" for i in ("", 2, 3))
    with pytest.raises(PatchlabValueError, match="panels, rows, windows"):
        figures.window_heatmaps(values[:2], ROWS, sliding_windows(6, 5), questions)


def _sweep(n_questions: int) -> "PatchResult":
    """A synthetic KRS sweep of ``n_questions`` questions on 3 components and 6 windows (no model run)."""
    from patchlab.patching.result import PatchResult

    rng = np.random.default_rng(n_questions)
    windows = sliding_windows(6, 5)
    per_question = {c: rng.normal(0.3, 0.6, (n_questions, len(windows))) for c in ROWS}
    questions = [f"who kept <the> Veltrani Codex in year {i} of the long northern winter, and where?" if i % 2
                 else f"who wrote text {i}?" for i in range(n_questions)]
    return PatchResult(scores={c: v.mean(0) for c, v in per_question.items()}, per_question=per_question,
                       windows=windows, questions=questions, answers=[""] * n_questions,
                       weights=np.ones(n_questions), settings={"window": 5, "n_tokens": 30})


@pytest.mark.parametrize("n_questions", [1, 10, 2000])
def test_per_question_page_stays_bounded_whatever_the_question_count(n_questions):
    """One heatmap per component (two, top and bottom k, past QUESTION_ROWS questions): 2,000 questions once
    gave 2,001 traces on a 202,120 px page."""
    res = _sweep(n_questions)
    fig = res.figure(per_question=True)
    panels = 1 if n_questions <= figures.QUESTION_ROWS else 2
    assert len(fig.data) == panels * len(ROWS)
    assert fig.layout.height <= 260 + figures.QUESTION_PX * figures.QUESTION_ROWS
    assert sum(len(t.y) for t in fig.data) == min(n_questions, figures.QUESTION_ROWS) * len(ROWS)
    axis = fig.layout.coloraxis  # one colour bar, diverging and centred on 0 for every panel
    assert axis.cmid == 0 and axis.cmin == -axis.cmax and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert len(fig.to_json()) < 400_000


def test_per_question_rows_are_ranked_with_a_dropdown_per_component():
    res = _sweep(2000)
    fig = res.figure(per_question=True)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ROWS
    assert [t.visible for t in fig.data] == [True, True] + [False] * 4  # the first component shown
    for c, (comp, button) in enumerate(zip(ROWS, buttons)):
        visible, layout = button.args
        assert visible["visible"] == [i // 2 == c for i in range(6)]
        means = res.per_question[comp].mean(1)
        order = np.argsort(-means, kind="stable")
        top, bottom = fig.data[2 * c], fig.data[2 * c + 1]
        np.testing.assert_array_equal(np.asarray(top.z), res.per_question[comp][order[:20]])  # highest first
        np.testing.assert_array_equal(np.asarray(bottom.z), res.per_question[comp][order[-20:]])
        labels = layout["yaxis.ticktext"]
        assert labels[0].startswith(f"Q{order[0] + 1}: ") and len(labels) == 20
        assert all(len(html.unescape(label)) <= figures.QUESTION_LABEL_CHARS for label in labels)
        assert layout["yaxis2.ticktext"][-1].startswith(f"Q{order[-1] + 1}: ")
    # the first component's labels are the page's own; the long question is cut in the label, whole in the hover
    assert list(fig.layout.yaxis.ticktext) == list(buttons[0].args[1]["yaxis.ticktext"])
    q = int(order[0])  # of the last component
    hover = fig.data[-2].text[0][1]
    assert hover.startswith(f"Q{q + 1}: ") and f"rank 1 of 2,000 by mean KRS ({means[q]:.3f})" in hover
    assert f"{ROWS[-1]}, layers 0-3<br>KRS {res.per_question[ROWS[-1]][q, 1]:.3f}" in hover
    long = next(t for t in fig.data[0].text if "Veltrani" in t[0])[0]
    assert "&lt;the&gt; Veltrani Codex" in long and "winter, and where?" in long.replace("<br>", " ")  # escaped, whole
    assert not UNFORMATTED.search(fig.data[0].hovertemplate)


def test_question_heatmap_rejects_bad_shapes():
    windows = sliding_windows(6, 5)
    with pytest.raises(PatchlabValueError, match="components, questions, windows"):
        figures.question_heatmap(np.zeros((3, 2, 5)), ROWS, windows, ["a", "b"])
    with pytest.raises(PatchlabValueError, match="at least one of each"):
        figures.question_heatmap(np.zeros((3, 0, 6)), ROWS, windows, [])
    with pytest.raises(PatchlabValueError, match="shown must be"):
        figures.question_heatmap(np.zeros((3, 2, 6)), ROWS, windows, ["a", "b"], shown=1)


def test_ranked_rows_put_all_nan_rows_last():
    values = np.array([[0.1, 0.2], [np.nan, np.nan], [0.9, np.nan], [-1.0, 0.0]])
    assert [list(b) for b in figures.ranked_rows(values, 4)] == [[2, 0, 3, 1]]
    assert [list(b) for b in figures.ranked_rows(values, 3)] == [[2], [3, 1]]


def test_titles_count_with_correct_plurals_and_name_the_models():
    assert figures.plural(1, "question") == "1 question" and figures.plural(0, "question") == "0 questions"
    one = figures.krs_title(1, window=5, n_tokens=1)
    assert "1 question " in one + " " and "1 questions" not in one and "1 token)" in one
    many = figures.krs_title(10, aggregate="pooled", window=3, n_tokens=30, vanilla="meta/llama", unlearned="runs/u")
    assert "pooled over 10 questions (window 3, 30 tokens)" in many
    assert "unlearned: runs/u vs vanilla: meta/llama" in many
    assert figures.krs_title(4, per_question=True).startswith("Knowledge Recovery Score per question (4 questions")


def test_sweep_scatter_hover_rounds_bleu_and_rouge():
    frame = pd.DataFrame([{"method": "ga", "strength": s, "settings": '{"lr": 0.001}',
                           "target_bleu": 100 / 3 * s, "unrelated_bleu": 100 - 1 / 3, "target_rouge_l": 1 / 3,
                           "unrelated_rouge_l": 2 / 3} for s in range(3)])
    template = figures.sweep_scatter(frame, "t").data[0].hovertemplate
    # only the integer strength and the settings string are shown as they are
    assert UNFORMATTED.findall(template) == ["%{customdata[0]}", "%{customdata[1]}"], template
    assert "strength=%{customdata[0]}" in template and "settings=%{customdata[1]}" in template
    assert "target_rouge_l=%{customdata[2]:.3f}" in template and "unrelated_rouge_l=%{customdata[3]:.3f}" in template
    assert "%{x:.1f}" in template and "%{y:.1f}" in template


def test_behavior_scores_one_box_per_set_and_metric_rounded():
    table = pd.DataFrame({"set": ["target", "target", "unrelated"], "question": ["a?", "b?", "c?"],
                          "before": ["x", "y", "z"], "after": ["q", "y", "z"], "bleu": [1 / 3, 100.0, 100.0],
                          "rouge_l": [1 / 3, 1.0, 1.0], "same": [False, True, True]})
    fig = figures.behavior_scores(table, "t")
    assert [(t.name, len(t.y)) for t in fig.data] == [("target", 2), ("unrelated", 1)] * 2
    assert fig.data[0].x[0] == "target (2 questions)" and fig.data[1].x[0] == "unrelated (1 question)"
    for trace, digits in zip(fig.data, (1, 1, 3, 3)):  # BLEU to 1 decimal, ROUGE-L to 3; text fields as they are
        assert re.findall(r"%\{y[^}]*\}", trace.hovertemplate) == [f"%{{y:.{digits}f}}"], trace.hovertemplate


def test_log_layer_module_heatmap_rejects_negative_values():
    table = pd.DataFrame({"attn_q": [1e-9, 0.0], "mlp_up": [-1e-3, 1e-5]}, index=[0, 1])
    with pytest.raises(PatchlabValueError, match="log colour scale"):
        figures.layer_module_heatmap(table, value_name="1 - cos", log=True)
    linear = figures.layer_module_heatmap(table, value_name="cosine", decimals=6)
    assert list(linear.data[0].text[0]) == ["0.000000", "-0.001000"]


def test_partial_flag_round_trips_and_is_checked():
    record = results_record({"results": {"none": 1.0}}, partial=True)
    assert list(record) == ["partial", "results"] and is_partial(record)
    assert not is_partial(results_record({}, partial=False))
    with pytest.raises(PatchlabValueError, match="partial"):
        results_record({"partial": False}, partial=True)
    with pytest.raises(PatchlabValueError, match="True or False"):
        results_record({}, partial=1)
    with pytest.raises(PatchlabValueError, match="boolean"):
        is_partial({"results": {}})


# ------------------------------------------------------------------------------------------------- HTML files


def _figure():
    return figures.window_heatmap(_values(6), ROWS, sliding_windows(6, 5), title="t")


def test_shared_plotlyjs_is_written_once_beside_the_pages(tmp_path):
    first = write_html(_figure(), tmp_path / "a.html")
    bundle = tmp_path / plotlyjs_name()
    assert bundle.read_text(encoding="utf-8") == get_plotlyjs()  # the installed copy: offline
    stamp = bundle.stat().st_mtime_ns
    second = write_html(_figure(), tmp_path / "b.html", plotlyjs="shared")
    assert bundle.stat().st_mtime_ns == stamp  # identical copy reused, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.html", "b.html", bundle.name])  # no temp files
    for page in (first, second):
        text = page.read_text(encoding="utf-8")
        assert f'src="{bundle.name}"' in text  # relative: the folder moves as a whole
        assert page.stat().st_size < 100_000 < len(get_plotlyjs())


def test_inline_pages_stay_self_contained(tmp_path):
    page = write_html(_figure(), tmp_path / "alone.html", plotlyjs="inline")
    assert page.stat().st_size > len(get_plotlyjs()) and list(tmp_path.iterdir()) == [page]


def test_shared_plotlyjs_never_replaces_a_foreign_file(tmp_path):
    (tmp_path / plotlyjs_name()).write_text("my own script")
    with pytest.raises(PatchlabFileError, match="not plotly's own bundle"):
        write_html(_figure(), tmp_path / "a.html")
    assert (tmp_path / plotlyjs_name()).read_text() == "my own script" and not (tmp_path / "a.html").exists()
    with pytest.raises(PatchlabValueError, match="plotlyjs must be one of"):
        write_html(_figure(), tmp_path / "b.html", plotlyjs="cdn")


def test_report_writers_share_one_bundle(vanilla_models, tmp_path):
    """A multi-page report (four parameter-diff heatmaps) holds one plotly.js, not four."""
    from patchlab.analysis.paramdiff import paramdiff
    from tests.conftest import ATTN_OR_UP, perturbed

    llama = vanilla_models["llama"]
    paths = paramdiff(llama, perturbed(llama, ATTN_OR_UP), progress=False).write_report(tmp_path / "out")
    pages = [p for p in paths.values() if p.suffix == ".html"]
    assert len(pages) == 4 and [p.name for p in (tmp_path / "out").glob("*.js")] == [plotlyjs_name()]
    assert sum(p.stat().st_size for p in pages) < 200_000


# ---------------------------------------------------------------------------- titles, cells, labels (issue 17)


def test_paramdiff_titles_name_both_models(vanilla_models):
    from patchlab.analysis.paramdiff import PARAM_METRICS, paramdiff
    from patchlab.results import model_names
    from tests.conftest import ATTN_OR_UP, perturbed

    llama = vanilla_models["llama"]
    diff = paramdiff(llama, perturbed(llama, ATTN_OR_UP), progress=False)
    vanilla, unlearned = model_names(diff.provenance)
    assert vanilla and unlearned
    for metric in PARAM_METRICS:
        title = diff.figure(metric).layout.title.text
        assert f"<sup>unlearned: {unlearned} vs vanilla: {vanilla}</sup>" in title, title


def _density_report(unscored: set[str]):
    """A two-method density report of a tiny LLaMA whose ``wanda`` mask leaves the ``unscored`` module types out
    (as wanda leaves the norms), at ratio 0.3 per layer."""
    from patchlab.pair.arch import arch_spec
    from patchlab.tiny import tiny_model
    from patchlab.unlearning.attribution import density, density_report, mask, scores

    model = tiny_model("llama", 40, n_layers=2)
    spec = arch_spec(model)
    full = mask(scores(model, method="random", seed=0), 0.3, per_layer=True)
    partial = {n: m for n, m in full.items() if spec.module_type(n) not in unscored}
    return density_report({"random": density(full, model), "wanda": density(partial, model)}, model=model,
                          source="org/tiny-llama", settings={"ratio": 0.3, "per_layer": True})


def test_density_pages_say_not_scored_name_the_model_and_ratio_and_show_cell_values():
    report = _density_report({"norm", "embedding"})
    heat, bars = report.figure("layers"), report.figure("modules")
    for fig in (heat, bars):
        assert "<sup>model: org/tiny-llama; top 30% of weights selected by each method, within each layer</sup>" \
            in fig.layout.title.text
    random, wanda = heat.data
    assert random.colorbar.title.text == "fraction<br>selected" and random.texttemplate == "%{text}"
    norm = list(wanda.x).index("norm")
    z = np.asarray(wanda.z, dtype=float)
    assert np.isnan(z[:, norm]).all() and not np.isnan(np.delete(z, norm, axis=1)).any()  # blank, not 0
    assert {row[norm] for row in wanda.text} == {"not<br>scored"} and {row[norm] for row in wanda.customdata} \
        == {"not scored"}
    cells = report.table.query("method == 'wanda' and module == 'attn_q'").set_index("layer")["density"]
    assert [row[list(wanda.x).index("attn_q")] for row in wanda.text] == [f"{cells[int(y)]:.2f}" for y in wanda.y]
    assert not any("not" in t for row in random.text for t in row)
    texts = dict(zip(bars.data[1].x, bars.data[1].text))  # wanda's bars
    assert texts["norm"] == texts["embedding"] == "not scored" and texts["attn_q"] == ""
    assert "not scored" not in set(bars.data[0].text)
    assert report.per_module.query("method == 'wanda' and module == 'norm'")["density"].item() == 0  # data kept


def test_density_pages_of_results_saved_before_the_scored_column(tmp_path):
    import patchlab

    report = _density_report({"norm"})
    data = report.to_dict()
    for row in data["densities"]:
        del row["scored"]
    old = type(report).from_dict(data)
    assert "scored" not in old.table and "scored" not in old.per_module
    assert not any("not" in t for trace in old.figure("layers").data for row in trace.text for t in row)
    assert isinstance(patchlab.load_result(report.save(tmp_path / "d.json")), type(report))


def test_sweep_points_are_labelled_by_strength():
    frame = pd.DataFrame([{"method": m, "strength": s, "settings": "{}", "target_bleu": 90 - 30 * s,
                           "unrelated_bleu": 95 - 5 * s, "target_rouge_l": 0.5, "unrelated_rouge_l": 0.5}
                          for m in ("ga", "npo") for s in (2, 0, 1)])
    fig = figures.sweep_scatter(frame, "t")
    for trace in fig.data:
        assert "text" in trace.mode and list(trace.text) == ["0", "1", "2"]  # weakest to strongest
        assert list(trace.x) == [90, 60, 30] and trace.textfont.color == trace.line.color
    assert "strength" in fig.layout.legend.title.text


def test_curves_of_one_pair_differ_by_colour():
    from patchlab.probes.base import Interval

    ivs = [Interval(0.5, 0.4, 0.6)] * 3
    lines = [figures.curve(range(3), ivs, name=f"r{r}", index=p, role=r, roles=3)[1] for p in (0, 1) for r in range(3)]
    assert len({line.line.color for line in lines}) == 6
    with pytest.raises(PatchlabValueError, match="role must be"):
        figures.curve(range(3), ivs, name="x", index=0, role=2, roles=2)


def test_pool_histograms_show_readings_of_exactly_0_and_1():
    """Knowledge readings pile up at 0 and 1; each end must fall inside a bin that lies inside the drawn axis."""
    from patchlab.reports.figures import pool_histograms

    fig = pool_histograms({"krs": {"P": [1.0, 1.0], "N": [0.0, 0.3]}}, title="t", bins=10)
    low, high = fig.layout.xaxis.range
    for trace in fig.data:
        start, end, size = trace.xbins.start, trace.xbins.end, trace.xbins.size
        for value in trace.x:  # away from every bin and axis edge by a quarter bin: not split or cut off
            assert start + size / 4 <= value <= end - size / 4 and low + size / 4 <= value <= high - size / 4
            offset = (value - start) / size % 1
            assert 0.25 <= offset <= 0.75, (value, start, size)
