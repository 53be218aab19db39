"""The result protocol: every registered result type saves, loads, tabulates, draws and reports the same way, and
its file is checked against its schema on load (a bad file is refused naming the field); on sweeps: resumable
progress, provenance, per-question tables, comparison, any result file read back by its format, legacy KRS files,
heatmaps a reader can trust."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import patchlab
import patchlab.patching.sweep as sweep_module
from patchlab.analysis.behavior import evaluate
from patchlab.analysis.method_sweep import SweepTask, method_sweep
from patchlab.analysis.paramdiff import ParamDiff, paramdiff, value_vector_changes
from patchlab.io import OutputDir
from patchlab.provenance import weights_digest
from patchlab.results import Result, register_result, result_types
from patchlab.schema import MAX_DEPTH
from patchlab.unlearning.attribution import density, density_report, mask, scores
from tests.conftest import ATTN_OR_UP, CORPUS, QUESTIONS, ROOT, perturbed

KW = dict(components=["coef", "attn"], window=2, n_tokens=4, progress=False)


@pytest.fixture(scope="module")
def pair(vanilla_models, tok):
    return patchlab.load_pair(vanilla_models["llama"], perturbed(vanilla_models["llama"], ATTN_OR_UP), tokenizer=tok)


def test_an_interrupted_sweep_resumes_at_the_next_question(pair, tmp_path, monkeypatch):
    full = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    real, calls = sweep_module.run_rows, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        patchlab.krs_sweep(pair, QUESTIONS, resume=tmp_path / "out", chunk=1, **KW)
    saved = json.loads((tmp_path / "out" / "sweep_progress.json").read_text())
    assert saved["partial"] is True and list(saved["done"]) == ["0"]  # the first question is kept, marked partial
    calls.clear()
    monkeypatch.setattr(sweep_module, "run_rows", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = patchlab.krs_sweep(pair, QUESTIONS, resume=tmp_path / "out", chunk=1, **KW)
    assert len(calls) == len(QUESTIONS) - 1  # only the unfinished questions ran
    for comp in full.components:
        np.testing.assert_allclose(resumed.per_question[comp], full.per_question[comp], atol=1e-6)
    assert json.loads((tmp_path / "out" / "sweep_progress.json").read_text())["partial"] is False
    with pytest.raises(patchlab.PatchlabFileError, match="other settings"):
        patchlab.krs_sweep(pair, QUESTIONS, resume=tmp_path / "out", **(KW | {"window": 3}))
    again = patchlab.krs_sweep(pair, QUESTIONS, resume=OutputDir(tmp_path / "out", "krs", overwrite=True),
                               **(KW | {"window": 3}))  # overwrite starts over
    assert len(again.windows) == pair.n_layers and again.settings["window"] == 3


def test_results_record_provenance_and_settings(pair, vanilla_models, tmp_path):
    res = patchlab.krs_sweep(pair, QUESTIONS[:2], **KW)
    prov = res.provenance
    assert prov["vanilla"]["weights"] == weights_digest(pair.vanilla_hf)
    assert prov["unlearned"]["weights"] == weights_digest(pair.unlearned_hf) != prov["vanilla"]["weights"]
    assert prov["vanilla"]["source"].startswith("in-memory LlamaForCausalLM")
    assert prov["environment"]["patchlab"] == patchlab.__version__
    expected = {"window": 2, "n_tokens": 4, "n_layers": pair.n_layers, "metric": "krs"}
    assert {k: prov["settings"][k] for k in expected} == expected  # the settings this sweep ran with
    vanilla_models["llama"].save_pretrained(tmp_path / "v")
    perturbed(vanilla_models["llama"], ATTN_OR_UP).save_pretrained(tmp_path / "u")
    from_disk = patchlab.load_pair(tmp_path / "v", tmp_path / "u", tokenizer=pair.tokenizer)
    assert from_disk.sources == (str((tmp_path / "v").resolve()), str((tmp_path / "u").resolve()))
    back = patchlab.load_result(res.save(tmp_path / "r.json"))
    assert isinstance(back, patchlab.PatchResult) and back.provenance == json.loads(json.dumps(prov))
    assert back.provenance["settings"] == back.settings == json.loads(json.dumps(res.settings))  # read apart
    assert back.provenance["settings"] is not back.settings


def test_per_question_tables_and_figures(pair, tmp_path):
    res = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    frame = res.to_frame(per_question=True)
    assert len(frame) == 2 * pair.n_layers * len(QUESTIONS)
    one = frame[(frame.component == "attn") & (frame.window == 1)].sort_values("question_index")
    np.testing.assert_allclose(one.krs, res.per_question["attn"][:, 1])
    paths = res.write_report(tmp_path / "rep")
    assert set(paths) >= {"krs.json", "krs.csv", "krs_per_question.csv", "krs.html", "krs_per_question.html"}
    fig = res.figure()
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert list(fig.layout.xaxis.ticktext) == ["0", "0-1", "1-2", "2-3"]  # window spans, not -0.5 / 0.5
    assert "10 questions" not in fig.layout.title.text and "3 questions" in fig.layout.title.text
    single = patchlab.krs_sweep(pair, QUESTIONS[:1], **KW)
    assert "1 question " in single.figure().layout.title.text + " "
    panels = res.figure(per_question=True)
    assert len(panels.data) == len(res.components)  # one question x window heatmap per component
    manifest = json.loads((tmp_path / "rep" / ".patchlab.json").read_text())
    assert set(manifest["files"]) >= {"krs.json", patchlab.io.plotlyjs_name()}  # the shared bundle is ours too


def test_compare_puts_two_sweeps_side_by_side_and_refuses_other_settings(pair, tmp_path):
    a = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    b = patchlab.krs_sweep(pair, QUESTIONS, **(KW | {"positions": "all", "engine": "loop"}))
    c = patchlab.compare(a, b)
    np.testing.assert_allclose(c.difference()["coef"], b.scores["coef"] - a.scores["coef"])
    assert np.abs(c.difference()["coef"]).max() < 1e-5  # the engines agree
    frame = c.to_frame()
    assert set(frame.columns) >= {"component", "layers", "difference"} and len(frame) == 2 * pair.n_layers
    back = patchlab.load_result(c.save(tmp_path / "c.json"))
    assert isinstance(back, patchlab.PatchComparison)
    np.testing.assert_allclose(back.difference()["attn"], c.difference()["attn"])
    other = patchlab.krs_sweep(pair, QUESTIONS, **(KW | {"positions": "answer"}))
    with pytest.raises(patchlab.PatchlabValueError, match="different positions"):
        patchlab.compare(a, other)
    with pytest.raises(patchlab.PatchlabValueError, match="different components"):
        patchlab.compare(a, patchlab.krs_sweep(pair, QUESTIONS, **(KW | {"components": ["coef"]})))


def test_legacy_krs_files_still_load(pair, tmp_path):
    res = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    legacy = {"format": "patchlab.KRSResult/1", "settings": res.settings, "windows": [list(w) for w in res.windows],
              "questions": res.questions, "answers": res.answers, "mse_unlearned": res.weights.tolist(),
              "krs": {c: v.tolist() for c, v in res.scores.items()},
              "per_question": {c: v.tolist() for c, v in res.per_question.items()}}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    old = patchlab.KRSResult.load(tmp_path / "old.json")
    assert old.metric == "krs"
    np.testing.assert_allclose(old.pooled()["attn"], res.pooled()["attn"])
    with pytest.raises(patchlab.PatchlabValueError, match="not a patchlab result file"):
        patchlab.load_result((tmp_path / "bad.json", (tmp_path / "bad.json").write_text("{}"))[0])


def test_overwritten_checkpoint_changes_the_digest(vanilla_models, tmp_path):
    model = vanilla_models["gpt2"]
    model.save_pretrained(tmp_path / "ckpt")
    before = weights_digest(tmp_path / "ckpt")
    changed = perturbed(model, ATTN_OR_UP, scale=1e-6)
    changed.save_pretrained(tmp_path / "ckpt")
    assert weights_digest(tmp_path / "ckpt") != before
    with torch.no_grad():
        assert weights_digest(changed) != weights_digest(model)


# ------------------------------------------------------------------------------------------ every result type


#: The tiny corpus's questions as TOFU records (answer, paraphrase, wrong answers), for the likelihood metrics.
TOFU_RECORDS = [{"question": q, "answer": a, "paraphrased_answer": p, "perturbed_answer": w}
                for q, a, p, w in zip(QUESTIONS, ["Mira Osk", "in Tarsk", "red"], ["Mira Osk in 1432", "Tarsk",
                                                                                   "the lamp is red"],
                                      [["Tarsk", "the lamp"], ["in 1432"], ["blue", "old"]])]


def _tiny_sweep(pair, out):
    """A method sweep of one gradient-ascent run on the tiny pair's vanilla model, into ``out`` (resumed there)."""
    task = SweepTask(name="tiny", forget=CORPUS[:2], retain=CORPUS[2:], target_questions=QUESTIONS[:1],
                     unrelated_questions=QUESTIONS[1:], subject="Veltrani Codex", cov_texts=CORPUS)
    return method_sweep(pair.vanilla_hf, pair.tokenizer, task, out, methods=["ga"],
                        grid={"ga": ({"lr": 1e-3, "epochs": 1, "batch_size": 2},)}, max_new_tokens=2, progress=False)


@pytest.fixture(scope="module")
def instances(pair, tmp_path_factory):
    """One result of every registered type, each made by its producing function on the tiny pair."""
    vanilla, unlearned = pair.vanilla_hf, pair.unlearned_hf
    sweep = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    masks = {method: mask(scores(vanilla, method=method), 0.5) for method in ("random", "magnitude")}
    diff = paramdiff(vanilla, unlearned, progress=False)
    diff.value_vectors = value_vector_changes(pair, top=3, top_tokens=2)
    made = [sweep, patchlab.compare(sweep, sweep), diff,
            density_report({name: density(m, vanilla) for name, m in masks.items()}, model=vanilla,
                           settings={"ratio": 0.5}),
            evaluate(pair, TOFU_RECORDS[:2], TOFU_RECORDS[2:], max_new_tokens=2, likelihood=("prob", "truth_ratio")),
            _tiny_sweep(pair, tmp_path_factory.mktemp("sweep")),
            patchlab.audit(pair, QUESTIONS, probes=["quantization"], progress=False,
                           settings={"common": {"n_boot": 20}, "quantization": {"bits": [8]}}),
            patchlab.meta_eval(tiny_zoo(pair, tmp_path_factory.mktemp("zoo")), ["quantization"], progress=False,
                               settings={"common": {"n_boot": 20}, "quantization": {"bits": [8]}},
                               bootstrap={"n_boot": 20})]
    return {type(r): r for r in made}


def tiny_zoo(pair, root):
    """A zoo of the tiny pair's two models saved in ``root``: the vanilla model full, the unlearned one negative."""
    members = []
    for role, who in (("full", "vanilla"), ("negative", "unlearned")):
        pair.model(who).save_pretrained(root / who)
        pair.tokenizer.save_pretrained(root / who)
        members.append(patchlab.zoo.Member(who, role, str(root / who)))
    return patchlab.zoo.Zoo("tiny", QUESTIONS, members)


def test_every_result_type_saves_loads_tabulates_draws_and_reports_alike(instances, tmp_path):
    assert set(instances) == set(result_types().values()), "every registered result type needs an instance here"
    for cls, res in instances.items():
        path = res.save(tmp_path / f"{cls.kind}.json")
        back = cls.load(path)
        assert type(back) is cls and type(patchlab.load_result(path)) is cls
        assert back.save(tmp_path / f"{cls.kind}-again.json").read_text() == path.read_text(), cls.__name__
        frame = res.to_frame()
        assert isinstance(frame, pd.DataFrame) and not frame.empty, cls.__name__
        pd.testing.assert_frame_equal(back.to_frame(), frame, obj=cls.__name__)
        assert isinstance(res.figure(), go.Figure) and isinstance(back.figure(), go.Figure)
        out = tmp_path / "reports" / cls.kind
        paths = res.write_report(out)
        assert f"{cls.stem or cls.kind}.json" in paths, cls.__name__
        assert all(p == out / name and p.is_file() for name, p in paths.items()), cls.__name__
        with pytest.raises(patchlab.PatchlabFileError, match="already holds"):
            res.write_report(out)
        assert res.write_report(out, overwrite=True) == paths
        manifest = json.loads((out / ".patchlab.json").read_text())
        assert set(paths) <= set(manifest["files"]) and manifest["kind"] == cls.kind
    fresh = subprocess.run([sys.executable, "-c", "import sys, patchlab\nfor p in sys.argv[1:]: "
                            "print(type(patchlab.load_result(p)).__name__)",
                            *(str(tmp_path / f"{cls.kind}.json") for cls in instances)],
                           capture_output=True, text=True, cwd=ROOT)
    assert fresh.stdout.split() == [cls.__name__ for cls in instances], fresh.stderr  # a new process reads them all


def test_results_record_the_checkpoints_they_come_from(instances, pair):
    digests = {who: weights_digest(pair.model(who)) for who in ("vanilla", "unlearned")}
    by_name = {cls.__name__: res for cls, res in instances.items()}
    for name in ("PatchResult", "ParamDiff", "BehaviorResult"):
        prov = by_name[name].provenance
        assert {who: prov[who]["weights"] for who in digests} == digests, name
        assert prov["environment"]["patchlab"] == patchlab.__version__
    assert by_name["DensityReport"].provenance["model"]["weights"] == digests["vanilla"]
    assert by_name["DensityReport"].provenance["settings"] == {"ratio": 0.5}
    sweep = by_name["SweepResult"]
    assert sweep.provenance["vanilla"]["weights"] == digests["vanilla"] and sweep.partial is False
    assert sweep.provenance["settings"]["plan"][0]["method"] == "ga"
    audit = by_name["AuditReport"].runs[0].provenance
    assert audit["checkpoints"]["unlearned"]["weights"] == digests["unlearned"]
    assert by_name["BehaviorResult"].settings["max_new_tokens"] == 2


def test_figures_come_from_the_presentation_layer_registry(monkeypatch):
    import dataclasses

    from patchlab import results
    from patchlab.probes import PROBES, Probe
    from patchlab.reports import views

    # every registered result type, and every built-in probe, is drawn by patchlab.reports.views
    for cls in set(result_types().values()):
        assert results.figure_function(cls).__module__ == views.__name__, cls
    for name, probe in PROBES.items():
        assert probe.draw is None and results.figure_function(name).__module__ == views.__name__, name

    @dataclasses.dataclass
    class Custom(results.Result):
        value: float = 1.0

    with pytest.raises(patchlab.PatchlabValueError, match="no figure is registered for Custom"):
        Custom().figure()
    monkeypatch.setattr(results, "_FIGURES", dict(results._FIGURES))
    results.register_figure(results.Result)(lambda r, scale=1: go.Figure(layout={"title": f"{r.value * scale}"}))
    assert Custom(2.0).figure(scale=3).layout.title.text == "6.0"  # looked up along the bases
    with pytest.raises(patchlab.PatchlabValueError, match="a result class or a probe name"):
        results.register_figure("")
    own = Probe(name="own", title="Own", run=lambda *a, **k: None, defaults={}, draw=lambda rs: go.Figure())
    assert isinstance(own.figure([]), go.Figure)
    with pytest.raises(patchlab.PatchlabValueError, match="no figure is registered for 'own'"):
        dataclasses.replace(own, draw=None).figure([])


# ------------------------------------------------------------------------------------------ result files checked


def _leaves(data, path=""):
    """``(path, container, key)`` of every value in a JSON document (lists: their first and last item only), paths
    spelled as the load errors spell them (``per_question.coef[0][1]``)."""
    items = data.items() if isinstance(data, dict) else [(i, v) for i, v in enumerate(data) if i in (0, len(data) - 1)]
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        yield where, data, key
        if isinstance(value, (dict, list)) and value:
            yield from _leaves(value, where)


def _mutated(text, index, what):
    """The JSON document ``text`` with its ``index``-th value (:func:`_leaves` order) replaced by an object, NaN or
    a 4000-digit integer (the last two for numbers only), its key dropped, or (a list) shortened or lengthened;
    ``None`` where the mutation does not apply (the format tag is never touched)."""
    doc = json.loads(text)
    _, container, key = list(_leaves(doc))[index]
    value = container[key]
    if key == "format" or (what in ("nan", "huge") and not isinstance(value, (int, float))):
        return None
    if what in ("shorter", "longer"):
        if not isinstance(value, list) or not value:
            return None
        container[key] = value[:-1] if what == "shorter" else value + value[-1:]
    elif what == "drop":
        if not isinstance(container, dict):
            return None
        del container[key]
    else:
        container[key] = {"object": {"x": [1]}, "nan": math.nan, "huge": 10**4000}[what]
    return doc


#: How many accepted corruptions per top-level field of a result file are drawn and saved again (each draws a figure).
DRAWN_PER_FIELD = 12


def test_every_result_file_is_checked_on_load_naming_the_bad_field(instances, tmp_path):
    """Every registered type (via the instances, one per type): each corrupted value is refused with a
    PatchlabValueError naming the file and the field, or (free-form fields, optional keys, lists of free length)
    loads as a result that tabulates, draws and saves; never an IndexError, KeyError, ValueError..."""
    assert all(cls.schema is not None for cls in result_types().values())
    path = tmp_path / "bad.json"
    for cls, res in instances.items():
        text = res.save(tmp_path / "good.json").read_text()
        refused, free, drawn = 0, (), {}
        for index, (field_path, _, _) in enumerate(list(_leaves(json.loads(text)))):
            if field_path.startswith(free):
                continue  # inside a free-form field (one that took an object): nothing more to learn there
            for what in ("object", "nan", "huge", "drop", "shorter", "longer"):
                doc = _mutated(text, index, what)
                if doc is None:
                    continue
                path.write_text(json.dumps(doc))
                case = f"{cls.__name__} {field_path} {what}"
                try:
                    back = (patchlab.load_result if refused % 2 else cls.load)(path)
                except patchlab.PatchlabValueError as err:
                    refused += 1
                    assert str(err).startswith(f"{path} is not a valid patchlab {cls.__name__} file"), case
                    if what in ("object", "nan", "huge"):  # the field itself, or a field inside it
                        assert re.search(rf" {re.escape(field_path)}(: |\.|\[)", str(err)), (case, str(err))
                    continue
                top = re.split(r"[.\[]", field_path)[0]
                drawn[top] = drawn.get(top, 0) + 1
                if drawn[top] <= DRAWN_PER_FIELD:  # free-form values load alike: draw a few per top-level field
                    assert isinstance(back.to_frame(), pd.DataFrame) and isinstance(back.figure(), go.Figure), case
                    assert type(cls.load(back.save(tmp_path / "again.json"))) is cls, case
                if what == "object":
                    free += (f"{field_path}.", f"{field_path}[")
        assert refused > 20, cls.__name__


def test_parameter_diffs_of_zero_tensors_store_nan_and_load_back(vanilla_models, tmp_path):
    """GPT-2's biases start at 0: their cosine and relative change are undefined, stored as NaN, read back as is."""
    vanilla = vanilla_models["gpt2"]
    diff = paramdiff(vanilla, perturbed(vanilla, ATTN_OR_UP), progress=False)
    assert diff.table["cosine"].isna().any()
    back = ParamDiff.load(diff.save(tmp_path / "d.json"))
    pd.testing.assert_frame_equal(back.to_frame(), diff.to_frame())
    data = json.loads((tmp_path / "d.json").read_text())
    data["tensors"][0]["diff2"] = math.nan  # the pooled sums are always finite
    (tmp_path / "nan.json").write_text(json.dumps(data))
    with pytest.raises(patchlab.PatchlabValueError, match=r"tensors\[0\]\.diff2: Input should be a finite number"):
        patchlab.load_result(tmp_path / "nan.json")


@pytest.fixture()
def sweep_file(instances, tmp_path):
    """``(path, data)``: a saved sweep and its JSON, to corrupt."""
    path = instances[patchlab.PatchResult].save(tmp_path / "krs.json")
    return path, json.loads(path.read_text())


def _refused(path, data, match, error=patchlab.PatchlabValueError):
    """``data`` written to ``path`` is refused by load_result and PatchResult.load alike, the message matching."""
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    for load in (patchlab.load_result, patchlab.PatchResult.load):
        with pytest.raises(error, match=match) as info:
            load(path)
        assert str(path) in str(info.value)


def test_load_refuses_wrong_types_naming_the_field(sweep_file):
    path, data = sweep_file
    data["scores"]["coef"][0] = "0.5"
    _refused(path, data, r"PatchResult file .*: scores\.coef\[0\]: Input should be a valid number, got '0\.5'")
    data["scores"]["coef"][0], data["windows"][1][0] = 0.5, True
    _refused(path, data, r"windows\[1\]\[0\]: Input should be a valid integer, got True")
    data["windows"][1][0], data["questions"] = 0, "who?"
    _refused(path, data, r"questions: Input should be a valid list")


def test_load_refuses_nan_where_scores_must_be_finite(sweep_file):
    path, data = sweep_file
    data["per_question"]["attn"][1][2] = math.nan
    _refused(path, data, r"per_question\.attn\[1\]\[2\]: Input should be a finite number, got nan")


def test_load_refuses_tables_whose_shapes_disagree(sweep_file):
    """More windows than score columns used to load, then fail with IndexError in to_frame()."""
    path, data = sweep_file
    good = copy.deepcopy(data)
    data["windows"].append([2, 4])
    _refused(path, data, r"scores\.coef: 4 scores for 5 windows")
    data = copy.deepcopy(good)
    data["per_question"]["attn"][1].pop()
    _refused(path, data, r"per_question\.attn\[1\]: 3 scores for 4 windows")
    data = copy.deepcopy(good)
    data["answers"].pop()
    _refused(path, data, r"answers: 2 answers for 3 questions")
    data = copy.deepcopy(good)
    data["windows"][2] = [3, 1]
    _refused(path, data, r"windows\[2\]: a window is \[start, stop\) with start < stop, got \[3, 1\]")
    comparison = {"format": "patchlab.PatchComparison/1", "labels": ["x", "y"], "a": good, "b": copy.deepcopy(good)}
    comparison["b"]["windows"].pop()
    path.write_text(json.dumps(comparison))
    with pytest.raises(patchlab.PatchlabValueError, match=r"b\.scores\.coef: 4 scores for 3 windows"):
        patchlab.load_result(path)


def test_load_refuses_huge_integers(sweep_file):
    """Past Python's int-string limit (4300 digits) json raises a bare ValueError; below it, a 64-bit field refuses."""
    path, data = sweep_file
    text = json.dumps(data).replace('"n_tokens": 4', '"n_tokens": ' + "1" * 5000, 1)
    _refused(path, text, r"cannot be read as JSON: it holds an integer too long to convert")
    data["windows"][1][0] = 10**4000
    _refused(path, data, r"windows\[1\]\[0\]: Input should be less than 9223372036854775808, got an integer of "
                         r"about 4001 digits")
    data["windows"][1][0], data["settings"]["n_tokens"] = 0, 10**4000
    _refused(path, data, r"settings\.n_tokens: an integer must fit 64 bits here")


def test_load_refuses_deep_nesting(sweep_file):
    """Nesting the parser cannot follow (RecursionError before) and free-form fields nested past MAX_DEPTH."""
    path, data = sweep_file
    _refused(path, "[" * 100_000 + "]" * 100_000, r"cannot be read as JSON: its lists and objects nest too deeply")
    data["provenance"]["settings"]["deep"] = json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    _refused(path, data, rf"provenance\.settings\.deep\[0\]\[0\].*: nested deeper than {MAX_DEPTH} levels")


def test_load_names_truncated_and_non_result_files(sweep_file, tmp_path):
    path, data = sweep_file
    text = path.read_text()
    _refused(path, text[:len(text) // 2], r"is not valid JSON \(it ends before the JSON value does: truncated\?\)")
    _refused(path, text[:-3], r"truncated\?")
    _refused(path, "", r"truncated\?")
    _refused(path, "[1, 2]", r"not a patchlab (result|PatchResult) file: it holds a JSON array, not an object")
    _refused(path, '{"format": 3}', r"its format tag is a JSON number, not a string")
    path.write_bytes(b"\xff\xfe binary")
    for load in (patchlab.load_result, patchlab.PatchResult.load):
        with pytest.raises(patchlab.PatchlabValueError, match=r"is not a UTF-8 text file \(byte 0"):
            load(path)
    with pytest.raises(patchlab.PatchlabValueError, match=r"not a patchlab result file \(format 'patchlab.Nope/1'\)"):
        patchlab.load_result((path, path.write_text('{"format": "patchlab.Nope/1"}'))[0])
    with pytest.raises(patchlab.PatchlabFileError, match="no such result file"):
        patchlab.load_result(tmp_path / "missing.json")
    legacy = {"format": "patchlab.KRSResult/1", **{k: data[k] for k in ("settings", "windows", "questions", "answers",
                                                                          "per_question")},
              "krs": data["scores"], "mse_unlearned": data["weights"][:2]}
    _refused(path, legacy, r"\(patchlab\.KRSResult/1\): mse_unlearned: 2 weights for 3 questions")


def test_a_resumed_method_sweep_checks_its_stored_runs(pair, tmp_path):
    _tiny_sweep(pair, tmp_path)
    run = next((tmp_path / "runs").glob("ga-s0-*.json"))
    record = json.loads(run.read_text())
    record["rows"][0]["bleu"] = "high"
    run.write_text(json.dumps(record))
    with pytest.raises(patchlab.PatchlabValueError, match=rf"{re.escape(str(run))} is not a valid patchlab "
                                                          r"method-sweep run record: rows\[0\]\.bleu: "):
        _tiny_sweep(pair, tmp_path)


def test_a_result_type_needs_a_schema():
    class Schemaless(Result):
        format = "patchlab.Schemaless/1"

    with pytest.raises(patchlab.PatchlabValueError, match="declares no schema"):
        register_result(Schemaless)
    assert "patchlab.Schemaless/1" not in result_types()
