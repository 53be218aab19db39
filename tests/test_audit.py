"""Residual-knowledge audit: bootstrap, probes (exactness), registry and settings, report files, resume, CLI.

The probes run on a real toy pair that needs no training: the vanilla toy model and the default concept's retain
model (which never saw the concept) in the unlearned slot.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import patchlab
from patchlab import toy
from patchlab.probes import (PROBES, AuditCase, AuditReport, Baselines, Interval, ProbeResult, audit_many, bootstrap,
                            resolve_settings)
from patchlab.probes import run as run_module
from patchlab.probes import scoring
from patchlab.probes import logit_lens as lens_probe
from patchlab.probes.bootstrap import mean_interval, ratio_of_gains
from patchlab.probes.quantization import quantize_, quantize_weight
from patchlab.probes.registry import probe_settings
from patchlab.probes.relearning import halves
from patchlab.probes.scoring import references, teacher_forced_logprob
from patchlab.reports import views
from patchlab.errors import PatchlabFileError, PatchlabValueError
from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")
BOOT = {"n_boot": 200, "level": 0.95, "seed": 0}


@pytest.fixture(scope="module")
def retain_pair():
    """(pair, questions, unrelated): vanilla vs the retain model on the default concept (4 + 6 questions)."""
    model_v, tok = toy.vanilla()
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    return patchlab.load_pair(model_v, toy.retain(), tokenizer=tok), record.qa[:4], record.unrelated_qa[:6]


def settings_for(probe: str, **overrides) -> dict:
    resolved = resolve_settings(list(PROBES.values()), {"common": {"n_boot": 200}, probe: overrides})
    return probe_settings(resolved, probe)


def run_probe(name, retain_pair, **overrides):
    pair, questions, unrelated = retain_pair
    return PROBES[name].run(pair, questions, unrelated=unrelated, retain=None, settings=settings_for(name, **overrides),
                            progress=False, baselines=Baselines())


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_contains_the_mean_and_shrinks_with_more_questions():
    values = np.array([0.1, 0.9, 0.4, 0.7, 0.0, 1.0, 0.3, 0.8, 0.5, 0.2])
    few = mean_interval(values, BOOT)
    many = mean_interval(np.tile(values, 4), BOOT)  # same distribution, 4x the questions
    assert few.value == pytest.approx(values.mean()) and many.value == pytest.approx(values.mean())
    for iv in (few, many):
        assert iv.low <= iv.value <= iv.high
    assert (many.high - many.low) < 0.7 * (few.high - few.low)
    assert mean_interval(values, BOOT) == few  # seeded
    assert mean_interval(values, {**BOOT, "seed": 1}) != few


def test_bootstrap_of_a_constant_is_a_point_and_ratios_skip_zero_gaps():
    assert mean_interval(np.full(5, 0.25), BOOT) == Interval(0.25, 0.25, 0.25)
    before, full = np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0])
    assert ratio_of_gains(full, before, full, BOOT).to_list() == [1.0, 1.0, 1.0]
    assert ratio_of_gains(before, before, full, BOOT).to_list() == [0.0, 0.0, 0.0]
    assert math.isnan(ratio_of_gains(full, full, full, BOOT).value)  # no gap to close
    with pytest.raises(PatchlabValueError, match="level"):
        bootstrap(lambda idx: 0.0, 3, level=1.5)
    with pytest.raises(PatchlabValueError, match="at least one"):
        mean_interval(np.array([]), BOOT)


# ------------------------------------------------------------------------------------------------ scoring


def test_retain_model_is_a_real_unlearned_reference(retain_pair):
    pair, questions, _ = retain_pair
    settings = settings_for("relearning")
    refs = references(pair.vanilla_hf, pair.tokenizer, questions, settings)
    assert refs.expected == [q.answer for q in questions]
    lp_v, lp_r = teacher_forced_logprob(pair.vanilla_hf, refs), teacher_forced_logprob(pair.unlearned_hf, refs)
    assert (lp_v > -0.1).all() and (lp_r < lp_v - 1.0).all()  # nats per answer token


# ------------------------------------------------------------------------------------------------ probes


def test_relearning_with_zero_steps_recovers_exactly_zero(retain_pair):
    result = run_probe("relearning", retain_pair, steps=[0], lr=1e-3)
    d = result.details
    assert d["vanilla"]["accuracy"] == 1.0 and d["unlearned"]["accuracy"] == 0.0
    for attack in ("held_out", "benign"):
        assert d[attack]["recovery_accuracy"] == [[0.0, 0.0, 0.0]]
        assert d[attack]["recovery_logprob"] == [[0.0, 0.0, 0.0]]
        assert d[attack]["per_question"][0]["logprob"] == d["unlearned"]["logprob"]
    assert result.score == Interval(0.0, 0.0, 0.0) and result.verdict == "erased"


def test_relearning_moves_the_held_out_half_and_halves_partition():
    a, b = halves(7, seed=3)
    assert sorted(a + b) == list(range(7)) and len(a) == 3 and not set(a) & set(b)
    assert halves(7, seed=3) == (a, b) and halves(7, seed=4) != (a, b)
    with pytest.raises(PatchlabValueError, match="at least 2"):
        halves(1, seed=0)


def test_relearning_fine_tunes(retain_pair):
    d = run_probe("relearning", retain_pair, steps=[0, 3], lr=1e-3).details
    assert d["steps"] == [0, 3]
    assert d["held_out"]["logprob"][1] != d["held_out"]["logprob"][0]  # the copies did train
    assert d["unlearned"]["logprob"] == run_probe("relearning", retain_pair, steps=[0]).details["unlearned"]["logprob"]


@pytest.mark.parametrize("bad", [{"steps": []}, {"steps": [5, 0]}, {"steps": [-1]}, {"lr": 0.0}, {"batch_size": 0}])
def test_relearning_rejects_bad_settings(retain_pair, bad):
    with pytest.raises(PatchlabValueError, match="relearning"):
        run_probe("relearning", retain_pair, **bad)


def test_quantize_weight_rounds_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen) * torch.arange(1, 7)[:, None]
    w[2] = 0.0
    q4 = quantize_weight(w, 4)
    levels = 2 ** 3 - 1
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    assert torch.equal(q4[2], w[2])
    for row in (0, 1, 3, 4, 5):
        assert len(torch.unique(q4[row])) <= 2 * levels + 1
        assert (q4[row] - w[row]).abs().max() <= scale[row, 0] / 2 + 1e-6
    assert (quantize_weight(w, 16) - w).abs().max() < 1e-3
    for bits in (1, 17, 4.0):
        with pytest.raises(PatchlabValueError, match="bits"):
            quantize_weight(w, bits)


def test_quantize_covers_every_linear_weight_but_embeddings_and_head():
    model, _ = toy.vanilla()
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize_(model, 3)
    head = model.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    assert "lm_head.weight" not in linear  # full precision, as real quantizers keep it
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in linear), name
        if name in linear:
            assert len(torch.unique(p[0])) <= 7


def test_quantization_at_16_bits_changes_nothing_measurable(retain_pair):
    result = run_probe("quantization", retain_pair, bits=[16], quantizer="rtn")
    d = result.details
    full, rounded = d["levels"]["unlearned"]["accuracy"]
    assert rounded == full and d["levels"]["vanilla"]["accuracy"][1][0] == 1.0
    assert d["per_question"]["unlearned"][0]["correct"] == d["unlearned"]["correct"]
    assert np.allclose(d["per_question"]["unlearned"][0]["logprob"], d["unlearned"]["logprob"], atol=1e-3)
    assert d["recovery_accuracy"][0] == [0.0, 0.0, 0.0]
    assert abs(d["recovery_logprob"][0][0]) < 1e-3
    assert result.verdict == "erased"


def test_krs_probe_headline_is_the_best_retrieval_window(retain_pair):
    result = run_probe("krs", retain_pair, components=["coef", "value"], window=2)
    d = result.details
    coef = np.array(d["sweep"]["scores"]["coef"])
    best = d["best"]
    assert best["component"] == "coef" and best["window"] == int(coef.argmax())
    assert result.score.value == pytest.approx(coef.max())
    assert result.score.low <= result.score.value <= result.score.high
    assert result.verdict == ("hidden" if coef.max() >= 0.5 else "erased")
    with pytest.raises(PatchlabValueError, match="without 'value'"):
        run_probe("krs", retain_pair, components=["value"])


def test_krs_probe_calls_an_identical_pair_intact():
    model_v, tok = toy.vanilla()
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    pair = patchlab.load_pair(model_v, toy.vanilla()[0], tokenizer=tok)
    result = PROBES["krs"].run(pair, record.qa[:2], unrelated=None, retain=None, settings=settings_for("krs"),
                               progress=False, baselines=Baselines())
    assert result.verdict == "intact" and math.isnan(result.score.value) and "degenerate" in result.details


def test_behavior_probe_scores_the_retain_model(retain_pair):
    result = run_probe("behavior", retain_pair)
    rows = result.details["rows"]
    target = [r["bleu"] for r in rows if r["set"] == "target"]
    assert result.score.value == pytest.approx(np.mean(target))
    unrelated = result.details["scores"]["unrelated"]["bleu"][0]
    assert unrelated > 90 > 50 > result.score.value  # the retain model answers the other concepts like vanilla
    assert result.verdict == "erased"


# ------------------------------------------------------------------------------------------------ audit runs


@pytest.fixture(scope="module")
def case(retain_pair):
    pair, questions, unrelated = retain_pair
    return AuditCase("retain model", pair, questions, unrelated, retain=None)


FAST = {"common": {"n_boot": 100}, "quantization": {"bits": [8]}, "relearning": {"steps": [0, 2], "lr": 1e-3}}


def test_settings_and_probe_selection_are_validated(case):
    with pytest.raises(PatchlabValueError, match="unknown probe"):
        audit_many([case], probes=["nope"])
    with pytest.raises(PatchlabValueError, match="unknown settings section"):
        audit_many([case], settings={"relearn": {}})
    with pytest.raises(PatchlabValueError, match="unknown quantization option"):
        audit_many([case], settings={"quantization": {"bit": [4]}})
    with pytest.raises(PatchlabValueError, match="distinct labels|differ"):
        audit_many([case, replace(case, label="Retain-model")], probes=["quantization"])
    no_unrelated = AuditCase("x", case.pair, case.questions)
    with pytest.raises(PatchlabValueError, match="needs unrelated"):
        audit_many([no_unrelated], probes=["behavior"])
    with pytest.raises(PatchlabValueError, match="questions"):
        AuditCase("x", case.pair, [])
    with pytest.raises(PatchlabValueError, match="question 0"):
        AuditCase("x", case.pair, [{"answer": "no question"}])


@pytest.mark.parametrize("bad, message", [
    ({"relearning": {"steps": [5, -1]}}, "relearning steps"), ({"quantization": {"bits": [0]}}, "bits"),
    ({"common": {"n_boot": 0}}, "n_boot"), ({"common": {"level": 1.5}}, "level"),
    ({"common": {"template": "no slot"}}, "template"), ({"krs": {"window": 99}}, "window"),
    ({"krs": {"components": ["value"]}}, "without 'value'"), ({"krs": {"components": ["coef+nope"]}}, "nope"),
    ({"krs": {"positions": "middle"}}, "positions"), ({"uds": {"threshold": 0}}, "threshold")])
def test_bad_setting_values_fail_before_any_probe_runs_or_the_directory_is_claimed(case, bad, message, tmp_path,
                                                                                  monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("a probe ran")

    monkeypatch.setattr(run_module, "_run_probe", no_compute)
    with pytest.raises(PatchlabValueError, match=message):
        audit_many([replace(case, retain=case.pair.vanilla_hf)], settings=bad, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_probes_lacking_an_input_are_skipped_and_noted(case, monkeypatch):
    ran = []

    def stub(name):
        def run(pair, questions, **kwargs):
            ran.append((name, kwargs["unrelated"], kwargs["settings"]["n_boot"]))
            return ProbeResult(probe=name, score=Interval(0.0, 0.0, 0.0), meaning="", verdict="erased", rule="")
        return run

    for name in PROBES:  # this test is about the plan, not the probes
        monkeypatch.setitem(PROBES, name, replace(PROBES[name], run=stub(name)))
    report = audit_many([AuditCase("x", case.pair, case.questions)], settings={"common": {"n_boot": 7}},
                        progress=False)
    assert ran == [(name, None, 7) for name, probe in PROBES.items() if not probe.needs]  # in registry order
    assert report.runs[0].skipped == {name: f"needs {probe.needs[0]}" for name, probe in PROBES.items() if probe.needs}
    assert report.runs[0].skipped == {"uds": "needs retain", "behavior": "needs unrelated"}
    assert "not run" in report.verdicts().loc["behavior", "x"]


def test_the_probes_of_one_case_share_its_baselines_and_cases_do_not(case, monkeypatch):
    computed, seen = [], []

    def fake_baselines(pair, questions, settings, progress=False):
        computed.append((id(pair), len(questions), settings["n_tokens"]))
        return object(), object(), object()

    def stub(name):
        def run(pair, questions, *, baselines, settings, **kwargs):
            seen.append((baselines, baselines.get(pair, questions, settings, False)))
            return ProbeResult(probe=name, score=Interval(0.0, 0.0, 0.0), meaning="", verdict="erased", rule="")
        return run

    monkeypatch.setattr(scoring, "baseline_scores", fake_baselines)
    for name in ("krs", "quantization"):
        monkeypatch.setitem(PROBES, name, replace(PROBES[name], run=stub(name)))
    audit_many([case, replace(case, label="again")], probes=["krs", "quantization"], progress=False)
    assert computed == [(id(case.pair), 4, 30)] * 2  # once per case, never across cases
    (first, krs), (same, quant), (second, krs_other), (_, quant_other) = seen
    assert first is same and second is not first  # one Baselines per case, passed to each of its probes
    assert krs is quant and krs_other is quant_other and krs_other is not krs
    baselines = Baselines()
    settings = settings_for("krs")
    assert baselines.get(case.pair, case.questions, settings) is baselines.get(case.pair, case.questions, settings)
    assert baselines.get(case.pair, case.questions, {**settings, "n_tokens": 5}) is not baselines.get(
        case.pair, case.questions, settings)  # another reference length is another baseline


def test_audit_writes_a_report_that_resumes_and_round_trips(case, tmp_path, monkeypatch):
    out = tmp_path / "audit"
    report = audit_many([case], probes=["quantization", "behavior"], settings=FAST, out_dir=out, progress=False)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"audit.json", "audit.csv", "audit.html", "probes/retain-model/quantization.json",
            "probes/retain-model/behavior.json", ".patchlab.json"} <= files
    loaded = AuditReport.load(out / "audit.json")
    assert loaded.to_dict() == json.loads((out / "audit.json").read_text())
    assert loaded.to_frame().equals(report.to_frame())
    prov = loaded.runs[0].provenance
    assert prov["checkpoints"]["unlearned"]["weights"] == patchlab.provenance.weights_digest(case.pair.unlearned_hf)
    assert prov["settings"]["quantization"]["bits"] == [8] and "torch" in prov["environment"]

    def fail(*args, **kwargs):
        raise AssertionError("a stored probe was recomputed")

    monkeypatch.setitem(PROBES, "quantization", replace(PROBES["quantization"], run=fail))
    again = audit_many([case], probes=["quantization", "behavior"], settings=FAST, out_dir=out, progress=False)
    assert again.to_frame().drop(columns="seconds").equals(report.to_frame().drop(columns="seconds"))
    with pytest.raises(PatchlabFileError, match="other settings"):
        audit_many([case], probes=["quantization"], settings={**FAST, "common": {"n_boot": 50}}, out_dir=out,
                   progress=False)


def test_report_html_is_self_contained_with_the_verdict_table_first(case, tmp_path):
    report = audit_many([case], probes=["quantization", "behavior"], settings=FAST, progress=False)
    both = AuditReport.concat([report, AuditReport([replace(report.runs[0], label="again")])])
    page = both.html()
    assert "<script src=" not in page and "Plotly" in page
    assert page.index('class="verdicts"') < page.index('id="quantization"') < page.index('id="behavior"')
    assert page.count('class="verdict" style') == 4  # 2 probes x 2 pairs
    paths = both.write_report(tmp_path / "r")
    assert set(paths) == {"audit.json", "audit.csv", "audit.html"} and all(p.is_file() for p in paths.values())
    assert not list((tmp_path / "r").glob("*.js"))  # the page is self-contained: no shared plotly.js beside it
    with pytest.raises(PatchlabFileError, match="already holds"):
        both.write_report(tmp_path / "r")
    overview = both.figure().data[0]
    assert np.array(overview.z).shape == (2, 2) and "erased" in overview.text[0][0]
    assert len(both.figure("quantization").data) == 16  # 2 pairs x 2 panels x 2 models x (line, band)
    with pytest.raises(PatchlabValueError, match="no result"):
        both.figure("krs")
    with pytest.raises(PatchlabValueError, match="distinct labels"):
        AuditReport.concat([report, report])


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(PatchlabFileError):
        AuditReport.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(PatchlabValueError, match="not a patchlab AuditReport file"):
        AuditReport.load(tmp_path / "x.json")


@pytest.fixture(scope="module")
def cli():
    return load_script("audit")


def test_cli_audits_the_toy_world_and_resumes(cli, tmp_path, capsys):
    out = tmp_path / "audit"
    argv = ["--probes", "quantization,behavior", "--bits", "8", "--n-boot", "50", "--sanity", "--out", str(out),
            "--quiet"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "graddiff" in first and "retain model" in first and "erased" in first
    stored = out / "probes" / "retain-model" / "quantization.json"
    mtime = stored.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert stored.stat().st_mtime_ns == mtime and capsys.readouterr().out == first
    assert AuditReport.load(out / "audit.json").runs[0].provenance["settings"]["relearning"]["lr"] == 1e-3  # toy


def test_cli_audits_checkpoints_side_by_side(cli, tmp_path, capsys):
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question": q.question}) for q in record.qa[:3]))
    out = tmp_path / "audit"
    code = cli.main(["--vanilla", str(toy.ASSETS), "--unlearned", str(toy.RETAIN_ASSETS), str(toy.RETAIN_ASSETS),
                     "--labels", "a,b", "--questions", str(questions), "--probes", "quantization", "--bits", "8",
                     "--n-boot", "20", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = AuditReport.load(out / "audit.json")
    assert report.labels == ["a", "b"] and report.runs[0].skipped == {}
    prov = report.runs[0].provenance
    assert prov["checkpoints"]["unlearned"]["source"] == str(toy.RETAIN_ASSETS.resolve())
    assert prov["questions"][0]["answer"] is None and prov["settings"]["relearning"]["lr"] == 1e-5
    assert report.result("a", "quantization").details["vanilla"]["accuracy"] == 1.0  # vanilla greedy = reference


@pytest.mark.parametrize("argv, message", [(["--vanilla", "x"], "--questions"),
                                           (["--unlearned", "a", "b", "--vanilla", "v", "--questions", "q.json",
                                             "--labels", "one"], "--labels"),
                                           (["--probes", "nope"], "unknown probe"),
                                           (["--threads", "0"], "--threads"),
                                           (["--relearn-steps", "5,-1"], "relearning steps"),
                                           (["--bits", "0"], "bits"), (["--n-boot", "0"], "n_boot"),
                                           (["--window", "99"], "window")])
def test_cli_reports_bad_input_in_one_line(cli, argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_uds_is_1_for_the_retain_model_and_0_for_the_vanilla_model():
    """UDS measures the unlearned model's layers against the retain model's: the retain model itself scores exactly
    1, a copy of the vanilla model 0 (to float rounding of the patched passes)."""
    from patchlab.patching.sweep import reference_answers
    from patchlab.probes.uds import unlearning_depth

    model_v, tok = toy.vanilla()
    retain = toy.retain()
    questions = [q.question for q in toy.world().record(toy.DEFAULT_CONCEPT).qa[:4]]
    as_retain = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    prompts, answers = reference_answers(as_retain, questions, n_tokens=8)
    erased = unlearning_depth(as_retain, retain, prompts, answers)
    assert np.isfinite(erased["uds"]).all() and (erased["d1"] > 0.05).any(axis=1).all()
    assert np.array_equal(erased["uds"], np.ones(len(questions)))
    intact = unlearning_depth(patchlab.load_pair(model_v, toy.vanilla()[0], tokenizer=tok), retain, prompts, answers)
    np.testing.assert_allclose(intact["uds"], 0.0, atol=1e-6)
    np.testing.assert_allclose(intact["d2"], 0.0, atol=1e-4)
    with pytest.raises(PatchlabValueError, match="threshold"):
        unlearning_depth(as_retain, retain, prompts, answers, threshold=0)


def test_logit_lens_at_the_last_layer_is_the_models_own_output(retain_pair):
    from patchlab.patching.sweep import reference_answers
    from patchlab.probes.logit_lens import logit_lens

    pair, qa, _ = retain_pair
    prompts, answers = reference_answers(pair, [q.question for q in qa], n_tokens=8)
    lens = logit_lens(pair.vanilla_hf, pair.arch, prompts, answers)
    for q, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.cat([p, a])
        with torch.no_grad():
            logits = pair.vanilla_hf(input_ids=ids[None]).logits[0, len(p) - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, a[:, None])[:, 0]
        assert lens["logprob"][q, -1] == pytest.approx(float(logp.mean()), abs=1e-5)
        ranks = (logits > logits.gather(-1, a[:, None])).sum(-1).add(1).sort().values.tolist()
        median = (ranks[(len(ranks) - 1) // 2] + ranks[len(ranks) // 2]) / 2
        assert lens["rank"][q, -1] == pytest.approx(median)
    assert lens["logprob"].shape == (len(qa), pair.n_layers) and (lens["rank"] >= 1).all()


@pytest.mark.parametrize("name", ["logit_lens", "uds"])
def test_depth_probes_on_the_toy_world(name):
    tp = toy.pair(method="graddiff", retain=True, progress=False)
    qa = toy.world().record(toy.DEFAULT_CONCEPT).qa[:4]
    settings = settings_for(name)
    result = PROBES[name].run(tp.pair, qa, unrelated=None, retain=tp.retain_model, settings=settings, progress=False,
                              baselines=Baselines())
    assert result.verdict in ("erased", "hidden") and 0.0 <= result.score.value <= 1.0
    assert result.score.low <= result.score.value <= result.score.high
    d = result.details
    if name == "logit_lens":
        # per question: the largest share over its informative layers (before the last, vanilla lens rank <= top_k)
        # of clip((u - f) / (v - f), 0, 1), the floor f the retain model's lens; the headline is their mean over
        # the questions with an informative layer (module docstring)
        lens = {who: np.array(d["per_question"][who]["logprob"]) for who in ("vanilla", "unlearned", "retain")}
        informative = np.array(d["per_question"]["vanilla"]["rank"]) <= settings["top_k"]
        informative[:, -1] = False
        assert informative.tolist() == d["informative"] and informative.any()
        gap = lens["vanilla"] - lens["retain"]
        kept = np.where(gap > 1e-9, (lens["unlearned"] - lens["retain"]) / np.where(gap > 1e-9, gap, 1.0), 0.0)
        kept = np.where(informative, np.clip(kept, 0, 1), -np.inf)
        has = informative.any(axis=1)
        np.testing.assert_allclose([x for x in d["shares"] if x is not None], kept.max(axis=1)[has], atol=1e-12)
        assert result.score.value == pytest.approx(np.mean(kept.max(axis=1)[has]))
    else:
        # per question: Σ d1·clip(d2/d1, 0, 1) / Σ d1 over the layers with d1 > threshold, None without one; the
        # headline is the mean over the questions that have one (module docstring)
        for u, d1, d2 in zip(d["uds"], np.array(d["d1"]), np.array(d["d2"])):
            knows = d1 > d["threshold"]
            assert (u is None) == (not knows.any())
            if u is not None:
                d1, d2 = d1[knows], d2[knows]
                assert u == pytest.approx((d1 * np.clip(d2 / d1, 0, 1)).sum() / d1.sum())
        assert result.score.value == pytest.approx(np.mean([u for u in d["uds"] if u is not None]))
    figure = PROBES[name].figure([("graddiff", result)])
    lines = sorted(t.name for t in figure.data if t.mode == "lines+markers")
    if name == "logit_lens":  # log-probability and rank panels, three models each
        assert lines == sorted(2 * ["graddiff: vanilla", "graddiff: unlearned", "graddiff: retain"])
    else:
        assert lines == ["graddiff: retain -> vanilla (d1)", "graddiff: unlearned -> vanilla (d2)"]
    assert len(figure.data) == 2 * len(lines)  # each line with its bootstrap band
    colours = {(t.name, t.line.color) for t in figure.data if t.mode == "lines+markers"}
    assert len({c for _, c in colours}) == len({n for n, _ in colours})  # curves differ by colour, not only dash
    if name == "logit_lens":
        assert "intermediate" not in result.meaning  # the choice includes layer 0, the first decoder layer
        means = np.where(informative, kept, 0.0).sum(axis=0) / np.maximum(informative.sum(axis=0), 1)
        best = int(np.where(informative.any(axis=0), means, -np.inf).argmax())
        assert result.note.startswith(f"most revealing informative layer on average: "
                                      f"{lens_probe.layer_name(best, tp.pair.n_layers)}")
        rank_axis = figure.layout.yaxis2
        assert rank_axis.type == "log" and "rank" in rank_axis.title.text and "log scale" in rank_axis.title.text
        assert list(rank_axis.tickvals[:4]) == [1, 2, 5, 10] and list(rank_axis.ticktext[:3]) == ["1", "2", "5"]
        highest = max(y for t in figure.data if t.xaxis == "x2" for y in t.y if np.isfinite(y))
        assert rank_axis.tickvals[-2] < highest <= rank_axis.tickvals[-1]


def test_logit_lens_names_layers_by_their_place():
    assert lens_probe.layer_name(0, 6) == "layer 0 (the first decoder layer)"
    assert lens_probe.layer_name(3, 6) == "layer 3 (intermediate)"
    assert lens_probe.layer_name(5, 6) == "layer 5 (the last: the model's output)"
    assert views.rank_ticks(1) == [1] and views.rank_ticks(700)[-3:] == [200, 500, 1000]
