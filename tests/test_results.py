"""The result protocol: every registered result type saves, loads, tabulates, draws and reports the same way; on
sweeps: resumable progress, provenance, per-question tables, comparison, any result file read back by its format,
legacy KRS files, heatmaps a reader can trust."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import patchlab
import patchlab.patching.sweep as sweep_module
from patchlab.analysis.behavior import SweepTask, evaluate, method_sweep
from patchlab.analysis.paramdiff import paramdiff
from patchlab.io import OutputDir
from patchlab.provenance import weights_digest
from patchlab.reports.results import result_types
from patchlab.unlearning.attribution import density, density_report, mask, scores
from tests.conftest import ATTN_OR_UP, CORPUS, QUESTIONS, perturbed

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


@pytest.fixture(scope="module")
def instances(pair, tmp_path_factory):
    """One result of every registered type, each made by its producing function on the tiny pair."""
    vanilla, unlearned = pair.vanilla_hf, pair.unlearned_hf
    sweep = patchlab.krs_sweep(pair, QUESTIONS, **KW)
    masks = {method: mask(scores(vanilla, method=method), 0.5) for method in ("random", "magnitude")}
    task = SweepTask(name="tiny", forget=CORPUS[:2], retain=CORPUS[2:], target_questions=QUESTIONS[:1],
                     unrelated_questions=QUESTIONS[1:], subject="Veltrani Codex", cov_texts=CORPUS)
    made = [sweep, patchlab.compare(sweep, sweep), paramdiff(vanilla, unlearned, progress=False),
            density_report({name: density(m, vanilla) for name, m in masks.items()}, model=vanilla,
                           settings={"ratio": 0.5}),
            evaluate(pair, QUESTIONS[:2], QUESTIONS[2:], max_new_tokens=2),
            method_sweep(vanilla, pair.tokenizer, task, tmp_path_factory.mktemp("sweep"), methods=["ga"],
                         grid={"ga": ({"lr": 1e-3, "epochs": 1, "batch_size": 2},)}, max_new_tokens=2,
                         progress=False),
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
