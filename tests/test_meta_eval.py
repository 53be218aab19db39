"""The zoo (roles, JSON/YAML files), the toy zoo, and the meta-evaluation of the probes: AUC and R/Q/HM arithmetic,
a tiny zoo end to end (resumable), the script, and the same numbers on a local Ray."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import patchlab

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.meta_evaluation import (MetaEvalResult, auc, auc_interval, knowledge, meta_eval, read_trust,
                                      revealed_share, robustness)
from patchlab.probes.base import Interval, ProbeResult
from patchlab.results import load_result
from patchlab.toy import zoo as toy_zoo
from patchlab.toy.build import SMALL, build, make_world
from patchlab.zoo import Member, Zoo, load_zoo
from tests.conftest import load_script

QUESTIONS = [{"question": "who wrote it ?", "answer": "Mira Osk"}]
#: A SMALL toy variant that learns its QA (0.98 greedy accuracy) in about 10 s.
LEARNT = dataclasses.replace(SMALL, steps=200, lr=1e-2)
#: Cheap probes and settings for the tiny zoo.
PROBES = ["logit_lens", "uds", "quantization"]
SETTINGS = {"common": {"n_boot": 20, "n_tokens": 6}}
ATTACKS = {"relearning": {"steps": 3, "lr": 1e-2}}


# ------------------------------------------------------------------------------------------------ zoo files

def test_zoo_file_json_and_yaml_resolve_paths_and_roles(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"x")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in QUESTIONS))
    members = [{"name": "full", "role": "full", "source": "ckpt"},
               {"name": "neg", "role": "negative", "source": "org/never-saw-it"},
               {"name": "unl", "role": "unlearned", "source": "ckpt", "weights": "w.safetensors", "note": "ga"}]
    (tmp_path / "zoo.json").write_text(json.dumps({"target": "t", "questions": "q.jsonl", "members": members}))
    import yaml

    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"target": "t", "questions": QUESTIONS, "members": members}))
    for name in ("zoo.json", "zoo.yaml"):
        zoo = load_zoo(tmp_path / name)
        assert zoo.full.source == str((tmp_path / "ckpt").resolve())
        assert zoo.member("neg").source == "org/never-saw-it"  # not a local path: a hub id
        assert zoo.member("unl").weights == str((tmp_path / "w.safetensors").resolve())
        assert [m.role for m in zoo.members] == ["full", "negative", "unlearned"] and zoo.retain is None
        assert zoo.questions[0].answer == "Mira Osk"
        assert Zoo.from_dict(json.loads(json.dumps(zoo.to_dict()))) == zoo


@pytest.mark.parametrize("change, message", [
    (lambda d: d["members"].pop(0), "exactly one 'full'"),
    (lambda d: d["members"].append({"name": "f2", "role": "full", "source": "x"}), "exactly one 'full'"),
    (lambda d: d["members"].append({"name": "a", "role": "retained", "source": "x"}), "role 'retained'"),
    (lambda d: d["members"].append({"name": "n", "role": "negative", "source": "x"}), "repeated: \\['n'\\]"),
    (lambda d: d.update(questions=[]), "non-empty list"),
    (lambda d: d.update(extra=1), "unknown zoo field"),
    (lambda d: d["members"].append({"name": "z", "role": "negative"}), "needs name, role and source"),
])
def test_zoo_file_errors_name_the_problem(tmp_path, change, message):
    data = {"target": "t", "questions": QUESTIONS,
            "members": [{"name": "f", "role": "full", "source": "x"}, {"name": "n", "role": "negative", "source": "y"}]}
    change(data)
    (tmp_path / "zoo.json").write_text(json.dumps(data))
    with pytest.raises(PatchlabValueError, match=message):
        load_zoo(tmp_path / "zoo.json")


def test_zoo_missing_files_raise_file_errors(tmp_path):
    with pytest.raises(PatchlabFileError, match="no zoo file"):
        load_zoo(tmp_path / "nope.json")
    (tmp_path / "zoo.yaml").write_text("target: [unclosed")
    with pytest.raises(PatchlabValueError, match="not valid YAML"):
        load_zoo(tmp_path / "zoo.yaml")
    with pytest.raises(PatchlabFileError, match="no weights file"):
        Member("m", "unlearned", "x", weights=str(tmp_path / "missing.safetensors"))


def test_shipped_zoo_members_have_the_roles_their_build_reports_say():
    """Each shipped from-scratch member never saw one half of the concepts and saw the other half."""
    concepts = toy_zoo.world().concepts
    for name in toy_zoo.ZOO_MEMBERS:
        path = toy_zoo.ZOO_ASSETS / name
        built = json.loads((path / "build.json").read_text())
        which = name.split("-")[1]
        assert toy_zoo.excluded(path) == toy_zoo.half(which) == concepts[0 if which == "a" else 1::2]
        assert built["excluded_qa_accuracy"] <= 0.2 and built["kept_qa_accuracy"] >= 0.8
        assert (path / "model.safetensors").stat().st_size < 6_000_000
        assert built["config"]["init_seed"] == int(name.split("-s")[1])


# ------------------------------------------------------------------------------------------------ statistics

def test_auc_counts_ordered_pairs_with_ties_as_half():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert math.isnan(auc([], [0.1]))
    value, low, high = auc_interval([0.9, 0.6, 0.4], [0.5, 0.1, 0.2], n_boot=200, level=0.9, seed=0)
    assert value == pytest.approx(8 / 9) and low <= value <= high <= 1.0


def _record(name, role, before, relearned=None, quantized=None):
    scores = {"before": {"p": {"m": before}}}
    if relearned is not None:
        scores |= {"relearned": {"p": {"m": relearned}}, "quantized": {"p": {"m": quantized}}}
    return {"name": name, "role": role, "scores": scores}


def test_robustness_follows_the_uds_definitions():
    models = [_record("ret", "retain", 0.1, 0.5, 0.1),          # relearning raises the retain model by 0.4
              _record("u1", "unlearned", 0.2, 0.8, 0.1),        # by 0.6: R = 0.4 / 0.6; Q = 0.1 / 0.2
              _record("u2", "unlearned", 0.2, 0.4, 0.3),        # by 0.2: R = min(2, 1); Q = min(1.5, 1)
              _record("u3", "unlearned", 0.0, 0.0, 0.0)]        # undefined R and Q (zero denominators)
    r = robustness(models, "p")
    assert r["per_model"]["u1"] == pytest.approx({"R": 0.4 / 0.6, "Q": 0.5})
    assert r["per_model"]["u2"] == pytest.approx({"R": 1.0, "Q": 1.0})
    assert r["n_R"] == r["n_Q"] == 2
    mean_r, mean_q = (0.4 / 0.6 + 1) / 2, 0.75
    assert r["R"] == pytest.approx(mean_r) and r["Q"] == pytest.approx(mean_q)
    assert r["HM"] == pytest.approx(2 * mean_r * mean_q / (mean_r + mean_q))


def test_revealed_share_adds_what_the_probe_brings_back():
    def result(full, member, headline, probe="krs"):
        return ProbeResult(probe, Interval(headline, headline, headline), "m", "erased", "r",
                           {"vanilla": {"accuracy": full}, "unlearned": {"accuracy": member}})
    assert revealed_share(result(1.0, 0.0, 0.25)) == 0.25
    assert revealed_share(result(0.8, 0.4, 0.5)) == pytest.approx(0.75)
    assert revealed_share(result(1.0, 1.0, math.nan)) == 1.0  # no gap: nothing to recover, all shown
    assert revealed_share(result(1.0, 0.0, 3.0)) == 1.0       # clipped
    assert math.isnan(knowledge(result(0.0, 0.0, 0.5)))         # the full model knows nothing: undefined
    uds = ProbeResult("uds", Interval(0.8, 0.7, 0.9), "m", "erased", "r", {})
    assert knowledge(uds) == pytest.approx(0.2)
    with pytest.raises(PatchlabValueError, match="no knowledge reading"):
        knowledge(ProbeResult("nope", Interval(0, 0, 0), "m", "erased", "r", {}))


# ------------------------------------------------------------------------------------------------ a tiny zoo

@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, one_thread):
    """A toy zoo on a SMALL world that learns its QA: vanilla (full), a member without the target (negative), a
    retain model, one fine-tuned copy of each, and GA-unlearned models at two strengths."""
    root = tmp_path_factory.mktemp("zoo")
    concepts = make_world(LEARNT).concepts
    build(LEARNT, root / "vanilla", progress=False)
    build(dataclasses.replace(LEARNT, init_seed=1), root / "retain", exclude_concept=concepts[0], progress=False)
    build(dataclasses.replace(LEARNT, init_seed=2), root / "neg", exclude_concept=concepts[::2], progress=False)
    return toy_zoo.toy(concepts[0], methods=("ga",), strengths=(1.0, 3.0), seeds=(1,), members=[root / "neg"],
                       checkpoint=root / "vanilla",
                       retain=root / "retain", cache=root / "cache", progress=False)


def test_toy_zoo_roles(tiny_zoo):
    assert [(m.name, m.role) for m in tiny_zoo.members] == [
        ("vanilla", "full"), ("neg", "negative"), ("retain", "retain"), ("vanilla-ft-s1", "positive"),
        ("retain-ft-s1", "negative"), ("neg-ft-s1", "negative"), ("ga", "unlearned"), ("ga-x3", "unlearned")]
    assert all(m.weights is None or m.weights.endswith(".safetensors") for m in tiny_zoo.members)
    weak, strong = (load_file(m.weights) for m in tiny_zoo.members[-2:])
    assert any(not torch.equal(weak[k], strong[k]) for k in weak)  # the strength reached the training


@pytest.fixture(scope="module")
def tiny_result(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "out"
    return out, meta_eval(tiny_zoo, PROBES, settings=SETTINGS, attacks=ATTACKS, bootstrap={"n_boot": 50},
                          out_dir=out, progress=False)


def test_meta_eval_on_a_tiny_zoo(tiny_result):
    out, result = tiny_result
    frame = result.to_frame()
    assert list(frame.probe) == PROBES and set(frame.n_P) == {2} and set(frame.n_N) == {3}
    for probe in PROBES:  # false alarms: never-saw models whose verdict says hidden or intact
        alarms = [r["name"] for r in result.models if r["role"] == "negative"
                  and r["scores"]["before"][probe]["verdict"] in ("hidden", "intact")]
        assert result.false_knowledge(probe) == alarms and result.summary(probe)["n_false"] == len(alarms)
        assert result.trusted()[probe].startswith("not trusted") or not alarms
    vanilla = next(r for r in result.models if r["role"] == "full")
    assert all(s["m"] == pytest.approx(1.0) for s in vanilla["scores"]["before"].values())  # the full model knows
    ga = next(r for r in result.models if r["role"] == "unlearned")
    assert set(ga["scores"]) == {"before", "relearned", "quantized"}
    for probe in PROBES:
        s = result.summary(probe)
        assert 0 <= s["auc"][1] <= s["auc"][0] <= s["auc"][2] <= 1
    loaded = load_result(out / "meta_eval.json")
    assert isinstance(loaded, MetaEvalResult)
    assert loaded.to_frame().equals(frame)
    page = (out / "meta_eval.html").read_text()
    assert "<script" in page and "Probe meta-evaluation" in page and "AUC" in page and len(page) > 1_000_000
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(f"{r['name']}.json" for r in result.models)


def test_meta_eval_resumes_per_member(tiny_zoo, tiny_result, monkeypatch):
    out, result = tiny_result
    (out / "models" / "neg.json").unlink()  # as if killed before this member finished
    import patchlab.meta_evaluation as me

    calls = []
    real = me.evaluate_member
    monkeypatch.setattr(me, "evaluate_member", lambda *a: calls.append(a[1]) or real(*a))
    again = meta_eval(tiny_zoo, PROBES, settings=SETTINGS, attacks=ATTACKS, bootstrap={"n_boot": 50}, out_dir=out,
                      progress=False)
    assert calls == ["neg"]
    assert again.to_frame().equals(result.to_frame())
    smaller = dataclasses.replace(tiny_zoo, members=[m for m in tiny_zoo.members if m.name != "retain-ft-s1"])
    fewer = meta_eval(smaller, PROBES, settings=SETTINGS, attacks=ATTACKS, bootstrap={"n_boot": 50}, out_dir=out,
                      progress=False)  # members may come and go: each record is reused while its checkpoint is
    assert calls == ["neg"] and len(fewer.models) == len(result.models) - 1
    relabelled = dataclasses.replace(tiny_zoo, members=[dataclasses.replace(m, role="positive") if m.name == "neg"
                                                        else m for m in tiny_zoo.members])
    meta_eval(relabelled, PROBES, settings=SETTINGS, attacks=ATTACKS, bootstrap={"n_boot": 50}, out_dir=out,
              progress=False)
    assert calls == ["neg", "neg"]  # another role (or other weights): another digest, recomputed


def test_meta_eval_bad_inputs(tiny_zoo, tmp_path):
    with pytest.raises(PatchlabValueError, match="takes a patchlab.zoo.Zoo"):
        meta_eval({"members": []})
    with pytest.raises(PatchlabValueError, match="unknown probe"):
        meta_eval(tiny_zoo, ["nope"])
    with pytest.raises(PatchlabValueError, match="unknown attack 'pruning'"):
        meta_eval(tiny_zoo, PROBES, attacks={"pruning": {}})
    with pytest.raises(PatchlabValueError, match="bits in 2..16"):
        meta_eval(tiny_zoo, PROBES, attacks={"quantization": {"bits": 1}})
    with pytest.raises(PatchlabValueError, match="unknown uds option"):
        meta_eval(tiny_zoo, PROBES, settings={"uds": {"nope": 1}})
    no_neg = dataclasses.replace(tiny_zoo, members=[m for m in tiny_zoo.members if m.role != "negative"])
    with pytest.raises(PatchlabValueError, match="at least one negative"):
        meta_eval(no_neg, PROBES)
    no_retain = dataclasses.replace(tiny_zoo, members=[m for m in tiny_zoo.members if m.role != "retain"])
    with pytest.raises(PatchlabValueError, match="need a retain model"):
        meta_eval(no_retain, ["uds"])


def test_trust_file_round_trip(tiny_result, tmp_path):
    _, result = tiny_result
    path = result.write_trust(tmp_path / "trust.json", command="python analyses/meta_eval.py --ship x")
    trust = read_trust(path)
    assert set(trust["trusted"]) == set(PROBES) and trust["command"].endswith("--ship x")
    assert all(v.startswith(("trusted", "not trusted")) for v in trust["trusted"].values())
    assert "/" not in json.dumps(trust["members"])  # names and roles only, no paths
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PatchlabValueError, match="not a patchlab probe trust file"):
        read_trust(tmp_path / "bad.json")


def test_script_on_a_zoo_file_and_its_errors(tiny_zoo, tmp_path, capsys):
    script = load_script("meta_eval")
    zoo_file = tiny_zoo.save(tmp_path / "zoo.json")
    out = tmp_path / "out"
    assert script.main(["--zoo", str(zoo_file), "--probes", "logit_lens", "--relearn-steps", "2", "--out", str(out),
                        "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "meta-evaluation on" in printed and "logit_lens" in printed and (out / "meta_eval.html").is_file()
    assert f"wrote {out / 'meta_eval.html'}" in printed
    assert script.main(["--zoo", str(zoo_file), "--concept", "x", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "describe the toy zoo" in capsys.readouterr().err
    assert script.main(["--zoo", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "no zoo file" in capsys.readouterr().err
    assert script.main(["--zoo", str(zoo_file), "--num-gpus", "-1", "--out", str(tmp_path / "o4"), "--quiet"]) == 2
    assert "--num-gpus must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Ray

def _cases(zoo):
    """Audit cases of the tiny zoo: the full model against the unlearned member and against the negative one."""
    from patchlab.pair import load_pair, load_tokenizer
    from patchlab.probes import AuditCase

    tok = load_tokenizer(zoo.full.source)
    return [AuditCase(name, load_pair(zoo.full.load(), zoo.member(name).load(), tokenizer=tok), zoo.questions,
                      zoo.unrelated, zoo.retain.load()) for name in ("ga", "neg")]


def test_ray_gives_the_in_process_numbers(tiny_zoo, tiny_result, tmp_path):
    """meta_eval and audit_many on a local Ray with 2 CPUs: the in-process numbers, results written per model."""
    ray = pytest.importorskip("ray")
    from patchlab.probes import audit_many

    _, local = tiny_result
    local_audit = audit_many(_cases(tiny_zoo), probes=PROBES, settings=SETTINGS, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = meta_eval(tiny_zoo, PROBES, settings=SETTINGS, attacks=ATTACKS, bootstrap={"n_boot": 50},
                           out_dir=tmp_path / "ray", ray=True, progress=False)
        remote_audit = audit_many(_cases(tiny_zoo), probes=PROBES, settings=SETTINGS, out_dir=tmp_path / "audit",
                                  ray=True, progress=False)
    finally:
        ray.shutdown()
    assert [r["name"] for r in remote.models] == [r["name"] for r in local.models]
    for a, b in zip(remote.models, local.models):
        for variant, probes in b["scores"].items():
            for probe, s in probes.items():
                np.testing.assert_allclose(a["scores"][variant][probe]["m"], s["m"], rtol=0, atol=1e-6)
    assert remote.to_frame().drop(columns="orientation").equals(local.to_frame().drop(columns="orientation"))
    assert len(list((tmp_path / "ray" / "models").iterdir())) == len(local.models)
    columns = ["label", "probe", "score", "low", "high", "verdict"]
    assert remote_audit.to_frame()[columns].equals(local_audit.to_frame()[columns])
    assert sorted(p.name for p in (tmp_path / "audit" / "probes" / "ga").iterdir()) == sorted(f"{p}.json"
                                                                                               for p in PROBES)


# ------------------------------------------------------------------------------------------------ the audit's trust

def test_overall_verdict_counts_only_the_trusted_probes(tmp_path):
    from patchlab.probes import AuditReport, AuditRun

    def result(probe, verdict):
        return ProbeResult(probe, Interval(0.5, 0.4, 0.6), "m", verdict, "r", {})

    runs = [AuditRun("a", {"krs": result("krs", "hidden"), "uds": result("uds", "erased")}),
            AuditRun("b", {"krs": result("krs", "hidden")})]
    trust = {"format": "patchlab.ProbeTrust/1", "target": "t", "command": "python analyses/meta_eval.py",
             "trusted": {"krs": "not trusted: AUC 0.50", "uds": "trusted: AUC 0.99"}}
    assert list(AuditReport(runs).overall().verdict) == ["hidden", "hidden"]  # no trust file: every probe counts
    report = AuditReport(runs, trust=trust)
    overall = report.overall()
    assert list(overall.verdict) == ["erased", "no trusted probe"] and overall.trusted[0] == "uds"
    assert "uds trusted: AUC 0.99" in overall.why[0]
    report.write_report(tmp_path / "audit")
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "Overall verdict" in page and "not trusted: AUC 0.50" in page
    assert AuditReport.load(tmp_path / "audit" / "audit.json").trust == trust


def test_toy_zoo_bad_inputs(tmp_path):
    with pytest.raises(PatchlabValueError, match="a half is 'a' or 'b'"):
        toy_zoo.half("c")
    with pytest.raises(PatchlabValueError, match="unknown toy unlearning method"):
        toy_zoo.toy(methods=("forgetful",), members=[], progress=False)
    with pytest.raises(PatchlabFileError, match="no toy checkpoint"):
        toy_zoo.toy(members=[tmp_path / "missing"], progress=False)
    with pytest.raises(PatchlabValueError, match="unknown toy concept .Nonexistent Thing."):
        toy_zoo.toy("Nonexistent Thing", members=[], progress=False)
    for strengths in [(0.0,), (-1.0,), (float("nan"),), (True,), ("2",)]:
        with pytest.raises(PatchlabValueError, match="finite positive learning-rate multiple"):
            toy_zoo.toy(strengths=strengths, members=[], progress=False)
    for strengths in [(), (1.0, 1.0)]:
        with pytest.raises(PatchlabValueError, match="strengths must be distinct and at least one"):
            toy_zoo.toy(strengths=strengths, members=[], progress=False)


def test_toy_strengths_scale_the_learning_rate_only(tmp_path):
    """Strength 1 is the tuned toy recipe itself (its cache key and file name unchanged); strength s multiplies the
    learning rate and nothing else, and gets its own cache file."""
    from patchlab.toy import cache

    for method in cache.toy_methods():
        tuned, double = cache.toy_method_settings(method), cache.toy_method_settings(method, 2.0)
        assert tuned == dict(cache.TUNED_TOY_SETTINGS.get(method, cache.TOY_TRAINING))
        assert double == {**tuned, "lr": 2 * tuned["lr"]}
    record = patchlab.toy.world().record(patchlab.toy.DEFAULT_CONCEPT)
    weights = patchlab.toy.ASSETS / "model.safetensors"
    paths = [cache.cached_path(record, "npo", [], weights, tmp_path, s) for s in (1.0, 1, 0.5)]
    assert paths[0] == paths[1] == cache.cached_path(record, "npo", [], weights, tmp_path)
    assert paths[2] != paths[0] and paths[2].name.startswith("veltrani-codex-npo-x0.5-")


def test_the_shipped_trust_file_is_of_the_default_toy_zoo():
    """The trust file the audit reads was computed on the default toy zoo as the code defines it now (its members,
    strengths and probe settings); regenerate it when they change (patchlab/toy/zoo.py's TRUST_FILE)."""
    from patchlab.toy.cache import strength_label

    shipped = json.loads(toy_zoo.TRUST_FILE.read_text())
    names = [m["name"] for m in shipped["members"]]
    unlearned = [strength_label(m, s) for m in toy_zoo.DEFAULT_METHODS for s in toy_zoo.DEFAULT_STRENGTHS]
    assert set(toy_zoo.ZOO_MEMBERS) | set(unlearned) | {"vanilla", "retain"} <= set(names)
    assert [m["name"] for m in shipped["members"] if m["role"] == "unlearned"] == unlearned
    assert shipped["settings"]["probes"] == toy_zoo.META_SETTINGS and shipped["target"] == patchlab.toy.DEFAULT_CONCEPT
