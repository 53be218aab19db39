"""Behavioural tests: BLEU / ROUGE-L, evaluate() on tiny pairs, and the resumable method sweep."""

from __future__ import annotations

import copy
import functools
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import CORPUS, QUESTIONS, load_script
from patchlab.analysis import method_sweep as sweep_module
from patchlab.unlearning import editing
from patchlab.analysis.behavior import BehaviorResult, evaluate
from patchlab.analysis.method_sweep import SweepResult, SweepTask, apply_method, method_sweep, run_key
from patchlab.analysis.text_metrics import lcs_length, rouge_l, sentence_bleu
from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE
from patchlab.pair import load_pair
from patchlab.provenance import weights_digest
from patchlab.tiny import tiny_model


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F1 = 2PR / (P + R) = 4/7
    assert lcs_length("abcd", "ace") == lcs_length("ace", "abcd") == 2
    assert rouge_l(list("abcd"), list("ace")) == pytest.approx(4 / 7)
    # beta = 2 weighs recall: 5 P R / (R + 4 P) = 5 * (1/2) * (2/3) / (2/3 + 2) = 5/8
    assert rouge_l(list("abcd"), list("ace"), beta=2.0) == pytest.approx(5 / 8)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([], [1]) == 0.0
    # order matters: a subsequence, not a bag of words
    assert rouge_l([3, 2, 1], [1, 2, 3]) == pytest.approx(1 / 3)


def test_sentence_bleu_scale():
    assert sentence_bleu("Wenna Lunt", "Wenna Lunt") == 100.0
    assert sentence_bleu("", "") == 100.0
    assert sentence_bleu("red", "Wenna Lunt") == 0.0
    partial = sentence_bleu("the Silent Sisters", "the Silent Order")
    assert 0.0 < partial < 100.0


@pytest.fixture(scope="module")
def tiny_pair(tok):
    vanilla = tiny_model("llama", len(tok), n_layers=2, seed=3)
    unlearned = copy.deepcopy(vanilla)
    with torch.no_grad():  # perturb the unembedding: a global change of the answers
        unlearned.lm_head.weight.add_(0.5 * torch.randn(unlearned.lm_head.weight.shape,
                                                          generator=torch.Generator().manual_seed(0)))
    return vanilla, unlearned


def test_evaluate_identical_models_score_perfectly(tok, tiny_pair):
    vanilla, _ = tiny_pair
    result = evaluate((vanilla, copy.deepcopy(vanilla), tok), QUESTIONS[:2], QUESTIONS[2:], max_new_tokens=2)
    assert list(result.table["set"]) == ["target", "target", "unrelated"]
    assert result.table["same"].all()
    assert result.averages == {s: {"bleu": 100.0, "rouge_l": 1.0, "same": 1.0} for s in ("target", "unrelated")}


def test_evaluate_changed_model_and_pair_input(tok, tiny_pair):
    vanilla, unlearned = tiny_pair
    pair = load_pair(vanilla, unlearned, tokenizer=tok)
    records = [{"question": q} for q in QUESTIONS]
    result = evaluate(pair, records, QUESTIONS, max_new_tokens=3)
    again = evaluate((vanilla, unlearned, tok), QUESTIONS, QUESTIONS, max_new_tokens=3)
    assert result.table.equals(again.table)
    assert not result.table["same"].all()
    # averages are the per-set means of the table; the ROUGE-L of an unchanged answer is 1
    assert result.target_bleu == pytest.approx(result.table.query("set == 'target'")["bleu"].mean())
    assert (result.table.loc[result.table["same"], "rouge_l"] == 1.0).all()
    assert result.target_bleu < 100.0
    assert set(result.summary()) == {f"{s}_{m}" for s in ("target", "unrelated") for m in ("bleu", "rouge_l", "same")}


def test_evaluate_sequential_pair_equals_the_pair_in_memory(tok, tiny_pair, tmp_path):
    for name, model in zip(("vanilla", "unlearned"), tiny_pair):
        model.save_pretrained(tmp_path / name)
    records = [{"question": q, "answer": "the"} for q in QUESTIONS]
    paths = (tmp_path / "vanilla", tmp_path / "unlearned")
    whole = evaluate(load_pair(*paths, tokenizer=tok), records, records, max_new_tokens=3, likelihood=["prob"])
    seq_pair = load_pair(*paths, tokenizer=tok, sequential=True)
    seq = evaluate(seq_pair, records, records, max_new_tokens=3, likelihood=["prob"])
    assert seq.table.equals(whole.table) and not seq.table["same"].all()
    assert seq.provenance["unlearned"]["weights"] == whole.provenance["unlearned"]["weights"]
    assert not seq_pair._resident  # both models released


def test_evaluate_rejects_bad_inputs(tok, tiny_pair):
    vanilla, unlearned = tiny_pair
    with pytest.raises(PatchlabValueError, match="ModelPair .in memory or sequential. or a tuple"):
        evaluate((vanilla, unlearned), QUESTIONS, QUESTIONS)
    with pytest.raises(PatchlabValueError, match="target QA set"):
        evaluate((vanilla, unlearned, tok), [], QUESTIONS)
    with pytest.raises(PatchlabValueError, match="question"):
        evaluate((vanilla, unlearned, tok), [{"answer": "x"}], QUESTIONS)


@pytest.fixture()
def tiny_task():
    return SweepTask(name="tiny", forget=CORPUS[:2], retain=CORPUS[2:], target_questions=QUESTIONS[:1],
                     unrelated_questions=QUESTIONS[1:], subject="Veltrani Codex", cov_texts=CORPUS)


GRID = {"ga": ({"lr": 1e-3, "epochs": 1, "batch_size": 2},),
        "memit_empty": ({"cov_weight": 1.0, "steps": 3, "layers": [0]},)}


def test_method_sweep_resumes_after_interruption(tok, tiny_pair, tiny_task, tmp_path, monkeypatch):
    vanilla, _ = tiny_pair
    before = {k: v.clone() for k, v in vanilla.state_dict().items()}
    real = sweep_module.apply_method
    calls = []

    def crash_on_memit(model, tokenizer, task, method, settings, **kw):
        calls.append(method)
        if method == "memit_empty":
            raise KeyboardInterrupt
        return real(model, tokenizer, task, method, settings, **kw)

    real_report = sweep_module.SweepResult.write_report
    reports = []

    def count_reports(self, out_dir):
        reports.append([r["method"] for r in self.records])
        return real_report(self, out_dir)

    monkeypatch.setattr(sweep_module.SweepResult, "write_report", count_reports)
    monkeypatch.setattr(sweep_module, "apply_method", crash_on_memit)
    with pytest.raises(KeyboardInterrupt):
        method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["ga", "memit_empty"], grid=GRID, max_new_tokens=2,
                     progress=False)
    assert calls == ["ga", "memit_empty"]
    assert reports == [["ga"]], "the interrupted sweep must leave a report of its finished run"
    assert json.loads((tmp_path / "sweep.json").read_text())["partial"] is True  # it says that runs are missing
    assert len(list((tmp_path / "runs").glob("ga-s0-*.json"))) == 1
    assert not list((tmp_path / "runs").glob("memit*")) and not list(tmp_path.rglob("*.tmp"))

    monkeypatch.setattr(sweep_module, "apply_method", real)
    calls.clear()
    reports.clear()
    seen = []
    result = method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["ga", "memit_empty"], grid=GRID,
                          max_new_tokens=2, progress=False, on_run=lambda r: seen.append(r["method"]))
    assert seen == ["ga", "memit_empty"]
    assert reports == [["ga", "memit_empty"]], "one report after the new run, none after the resumed one"
    assert all(torch.equal(before[k], v) for k, v in vanilla.state_dict().items()), "the sweep modified vanilla"
    frame = result.to_frame()
    assert list(frame["method"]) == ["ga", "memit_empty"]
    assert frame[["target_bleu", "unrelated_bleu"]].apply(lambda c: c.between(0, 100)).all().all()
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["method"] for r in saved["records"]] == ["ga", "memit_empty"] and saved["partial"] is False
    assert saved["provenance"]["vanilla"]["weights"] == weights_digest(vanilla)
    assert len(saved["records"][0]["rows"]) == len(QUESTIONS)
    assert "plotly" in (tmp_path / "sweep.html").read_text()[:100_000].lower()

    # a finished sweep recomputes nothing; changed settings are a new run
    monkeypatch.setattr(sweep_module, "apply_method", crash_on_memit)
    calls.clear()
    reports.clear()
    method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["ga", "memit_empty"], grid=GRID, max_new_tokens=2,
                 progress=False)
    assert calls == []
    assert reports == [["ga", "memit_empty"]], "a fully resumed sweep writes its report once, at the end"
    assert json.loads((tmp_path / "sweep.json").read_text())["partial"] is False
    grid = {"ga": ({"lr": 2e-3, "epochs": 1, "batch_size": 2},)}
    method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["ga"], grid=grid, max_new_tokens=2, progress=False)
    assert calls == ["ga"]


def test_run_key_covers_the_template(tiny_task):
    key = functools.partial(run_key, tiny_task, "ga", 0, {"lr": 1e-3}, "model", 30)
    assert key(DEFAULT_TEMPLATE) == key(DEFAULT_TEMPLATE)
    assert key(DEFAULT_TEMPLATE) != key("Q: {question}\nA:")


def test_apply_method_forwards_the_template(tok, tiny_pair, tiny_task, monkeypatch):
    # the editing baselines must key their edit on the prompt that is scored, the fine-tuning methods format
    # their QA records with it
    template = "Q: {question}\nA:"
    seen = {}

    def record(name):
        def fake(model, *args, **kwargs):
            seen[name] = kwargs
            return SimpleNamespace(model=model)
        return fake

    sweep_module.method_names()  # discover the method registry before memit is faked (its defaults are read)
    monkeypatch.setattr(editing, "memit", record("memit"))
    monkeypatch.setattr(sweep_module, "unlearn", record("unlearn"))
    model = tiny_pair[0]
    for method in ("memit_empty", "memit_entropy", "npo"):
        assert apply_method(model, tok, tiny_task, method, {"layers": [0]}, template=template) is model
        assert seen.pop("unlearn" if method == "npo" else "memit")["template"] == template
    with pytest.raises(PatchlabValueError, match="template argument"):
        apply_method(model, tok, tiny_task, "ga", {"template": template})


def test_method_sweep_validates(tok, tiny_pair, tiny_task, tmp_path):
    vanilla, _ = tiny_pair
    with pytest.raises(PatchlabValueError, match="unknown method 'rome'"):
        method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["rome"], progress=False)
    with pytest.raises(PatchlabValueError, match="no settings"):
        method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["npo"], grid=GRID, progress=False)


def test_sweep_task_from_json(tmp_path, tiny_task):
    path = tmp_path / "task.json"
    with pytest.raises(PatchlabFileError, match="no such task file"):
        SweepTask.from_json(path)
    path.write_text(json.dumps({k: v for k, v in tiny_task.__dict__.items() if k != "cov_texts"}))
    loaded = SweepTask.from_json(path)
    assert loaded.cov_texts == tiny_task.forget + tiny_task.retain and loaded.subject == tiny_task.subject
    path.write_text(json.dumps({"forget": ["x"], "retain": [], "target_questions": ["q"],
                                "unrelated_questions": ["q"], "subject": "s"}))
    with pytest.raises(PatchlabValueError, match="'retain' must be a non-empty list"):
        SweepTask.from_json(path)
    fields = {k: v for k, v in tiny_task.__dict__.items() if k != "name"}
    path.write_text(json.dumps({**fields, "cov_texts": CORPUS[:1]}))
    assert SweepTask.from_json(path).cov_texts == CORPUS[:1]
    path.write_text(json.dumps({**fields, "cov_texts": "one text"}))  # a string is not split into characters
    with pytest.raises(PatchlabValueError, match="'cov_texts' must be a non-empty list"):
        SweepTask.from_json(path)
    path.write_text(json.dumps({**fields, "target_questions": [*tiny_task.target_questions, "what colour ?"]}))
    with pytest.raises(PatchlabValueError, match="'Veltrani Codex' does not occur in the target question 'what colour"):
        SweepTask.from_json(path)
    path.write_text("{not json")
    with pytest.raises(PatchlabValueError, match="not valid JSON"):
        SweepTask.from_json(path)


def test_cli_reports_bad_task_file(tmp_path, capsys):
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).parents[1] / "analyses" / "method_sweep.py"
    spec = importlib.util.spec_from_file_location("method_sweep_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--vanilla", str(tmp_path), "--task", str(tmp_path / "missing.json")]) == 2
    assert "no such task file" in capsys.readouterr().err


def test_behavior_result_averages_per_set():
    import pandas as pd

    table = pd.DataFrame({"set": ["target", "target", "unrelated"], "bleu": [0.0, 50.0, 100.0],
                          "rouge_l": [0.0, 0.5, 1.0], "same": [False, False, True]})
    result = BehaviorResult(table)
    assert result.averages["target"] == {"bleu": 25.0, "rouge_l": 0.25, "same": 0.0}
    assert result.unrelated_bleu == 100.0


def test_sweep_figure_joins_each_methods_strengths_in_order():
    records = [{"method": m, "strength": s, "settings": {"lr": s}, "target_bleu": float(10 * s + i),
                "unrelated_bleu": float(90 - s), "target_rouge_l": 0.0, "unrelated_rouge_l": 0.0, "seconds": 0.0}
               for s in (2, 0, 1) for i, m in enumerate(("npo", "ga"))]
    fig = SweepResult(task="t", records=records).figure()
    assert [t.name for t in fig.data] == ["npo", "ga"]  # first-seen order kept
    for i, trace in enumerate(fig.data):
        assert list(trace.x) == [0.0 + i, 10.0 + i, 20.0 + i]  # weakest to strongest
        assert "lines" in trace.mode and "markers" in trace.mode


def test_resume_key_hashes_the_weights_not_the_name(tok, tiny_pair, tiny_task, tmp_path, monkeypatch):
    """A checkpoint overwritten in place (same path, same config, other weights) is a new run, never 'done'."""
    vanilla, unlearned = tiny_pair
    ckpt = tmp_path / "ckpt"
    vanilla.save_pretrained(ckpt)
    grid = {"ga": ({"lr": 1e-3, "epochs": 1, "batch_size": 2},)}
    real = sweep_module.apply_method
    calls = []
    monkeypatch.setattr(sweep_module, "apply_method", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    sweep = functools.partial(method_sweep, tokenizer=tok, task=tiny_task, out_dir=tmp_path / "sweep",
                              methods=["ga"], grid=grid, max_new_tokens=2, progress=False)
    sweep(ckpt)
    sweep(ckpt)
    assert calls == ["ga"]  # same weights: resumed
    unlearned.save_pretrained(ckpt)  # overwritten in place
    sweep(ckpt)
    assert calls == ["ga", "ga"]
    assert len(list((tmp_path / "sweep" / "runs").glob("ga-s0-*.json"))) == 2


def test_new_methods_run_through_the_method_sweep(tok, tiny_pair, tiny_task, tmp_path):
    vanilla, _ = tiny_pair
    grid = {"simnpo": ({"lr": 1e-2, "epochs": 1, "batch_size": 2},),
            "rmu": ({"lr": 1e-2, "epochs": 1, "batch_size": 2, "layer": 1, "steering_coeff": 10.0},)}
    result = method_sweep(vanilla, tok, tiny_task, tmp_path, methods=["simnpo", "rmu"], grid=grid, max_new_tokens=2,
                          progress=False)
    assert [(r["method"], r["settings"]) for r in result.records] == [(m, grid[m][0]) for m in ("simnpo", "rmu")]
    frame = result.to_frame().set_index("method")
    assert frame.loc["simnpo", "target_same"] < 1  # the run changed the target answers
    with pytest.raises(PatchlabValueError, match="no setting 'beta'; its settings: layer, update_layers"):
        method_sweep(vanilla, tok, tiny_task, tmp_path / "bad", methods=["rmu"], grid={"rmu": ({"beta": 1.0},)},
                     progress=False)
    assert not (tmp_path / "bad").exists()  # the grid is checked before anything is written


def test_method_sweep_cli_runs_the_new_methods_from_the_registry(tok, tiny_pair, tiny_task, tmp_path, capsys):
    from patchlab.unlearning.methods import get_method

    vanilla, _ = tiny_pair
    vanilla.save_pretrained(tmp_path / "vanilla")
    tok.save_pretrained(tmp_path / "vanilla")
    (tmp_path / "task.json").write_text(json.dumps(tiny_task.__dict__))
    code = load_script("method_sweep").main(["--vanilla", str(tmp_path / "vanilla"), "--task",
                                              str(tmp_path / "task.json"), "--methods", "simnpo,rmu",
                                              "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    runs = [(r["method"], r["settings"]) for r in saved["records"]]
    assert runs == [(m, s) for m in ("simnpo", "rmu") for s in get_method(m).sweep]  # the registry's grid
