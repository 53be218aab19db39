"""The result protocol on sweeps: resumable progress, provenance, per-question tables, comparison, any result file
read back by its format, legacy KRS files, heatmaps a reader can trust."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import patchlab
import patchlab.patching.sweep as sweep_module
from patchlab.io import OutputDir
from patchlab.provenance import weights_digest
from tests.conftest import ATTN_OR_UP, QUESTIONS, perturbed

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
    assert prov["environment"]["patchlab"] == patchlab.__version__ and prov["settings"] == res.settings
    vanilla_models["llama"].save_pretrained(tmp_path / "v")
    perturbed(vanilla_models["llama"], ATTN_OR_UP).save_pretrained(tmp_path / "u")
    from_disk = patchlab.load_pair(tmp_path / "v", tmp_path / "u", tokenizer=pair.tokenizer)
    assert from_disk.sources == (str((tmp_path / "v").resolve()), str((tmp_path / "u").resolve()))
    back = patchlab.load_result(res.save(tmp_path / "r.json"))
    assert isinstance(back, patchlab.PatchResult) and back.provenance == json.loads(json.dumps(prov))


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
    assert len(panels.data) == len(QUESTIONS)
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
