"""Probe fixes (issue 20): inconclusive verdicts with reasons, shared-answer relearning and its false-answer control,
the logit lens's informative layers and floor, real quantizers, UDS's answer span, and the null pair."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import patchlab
from patchlab import toy
from patchlab.errors import PatchlabValueError
from patchlab.pair.qa import QA
from patchlab.probes import PROBES, AuditCase, Baselines, ProbeResult, audit_many, resolve_settings
from patchlab.probes import relearning
from patchlab.probes.quantization import quantized, resolve_quantizer
from patchlab.probes.registry import probe_settings
from patchlab.probes.scoring import Scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_models():
    model_v, tok = toy.vanilla()
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    questions = record.qa[:4]
    unrelated = record.unrelated_qa[:4]
    return model_v, tok, questions, unrelated


def settings_for(probe: str, **overrides) -> dict:
    resolved = resolve_settings(list(PROBES.values()), {"common": {"n_boot": 100}, probe: overrides})
    return probe_settings(resolved, probe)


def run(name, pair, questions, unrelated=None, retain=None, **overrides) -> ProbeResult:
    return PROBES[name].run(pair, questions, unrelated=unrelated, retain=retain,
                            settings=settings_for(name, **overrides), progress=False, baselines=Baselines())


def test_inconclusive_needs_a_reason_and_only_it():
    from patchlab.probes import Interval
    iv = Interval(0.5, 0.4, 0.6)
    with pytest.raises(PatchlabValueError, match="reason"):
        ProbeResult("x", iv, "m", "inconclusive", "r")
    with pytest.raises(PatchlabValueError, match="reason"):
        ProbeResult("x", iv, "m", "erased", "r", reason="why")
    assert ProbeResult("x", iv, "m", "inconclusive", "r", reason="why").reason == "why"


# ------------------------------------------------------------------------------------------------ relearning


def test_halves_keep_shared_answers_apart_when_they_can():
    answers = ["Paris", "paris.", "Lyon", "Lyon", "Rome", "The Rome"]
    a, b = relearning.answer_halves(answers, seed=0)
    assert sorted(a + b) == list(range(6)) and not relearning.shared_answers(answers, a, b)
    one = ["Paris"] * 4
    assert relearning.shared_answers(one, *relearning.answer_halves(one, seed=0)) == ["paris"]


def test_false_answers_map_each_answer_to_another_consistently():
    wrong = relearning.false_answers(["Paris", "Paris", "Rome"], [], seed=0)
    assert wrong[0] == wrong[1] == "Rome" and wrong[2] == "Paris"
    shared = relearning.false_answers(["Paris"] * 3, ["Tokyo", "a much longer sentence answer here"], seed=0)
    assert len(set(shared)) == 1 and shared[0] != "Paris"
    assert relearning.false_answers(["Paris"] * 3, [], seed=0) is None


def fake_curve(recovered: float, control: float):
    """A held_out_curve stand-in: the held-out attack ends at ``recovered`` accuracy, the false-answer control (the
    second call) at ``control``."""
    calls = []

    def curve(model, tok, refs, settings, steps, progress):
        n = len(refs.questions)
        value = recovered if not calls else control
        calls.append(refs)
        return [Scores(np.zeros(n), np.zeros(n))] + [Scores(np.full(n, value), np.zeros(n))] * (len(steps) - 1)

    return curve


@pytest.mark.parametrize("control, verdict", [(1.0, "inconclusive"), (0.0, "hidden")])
def test_the_false_answer_control_gates_relearning(toy_models, monkeypatch, control, verdict):
    model_v, tok, questions, unrelated = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    monkeypatch.setattr(relearning, "held_out_curve", fake_curve(1.0, control))
    result = run("relearning", pair, questions, unrelated, steps=[0, 1])
    assert result.details["false_control"]["gain"] == pytest.approx(control)
    assert result.verdict == verdict
    assert ("false answers" in result.reason) == (verdict == "inconclusive")


def test_shared_answers_warn_and_without_a_control_are_inconclusive(toy_models, monkeypatch):
    model_v, tok, questions, _ = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    same = [QA(q.question, questions[0].answer) for q in questions]
    monkeypatch.setattr(relearning, "held_out_curve", fake_curve(1.0, 0.0))
    with pytest.warns(UserWarning, match="share answers"):
        result = run("relearning", pair, same, steps=[0, 1])  # one answer, no unrelated: no false answer exists
    assert result.verdict == "inconclusive" and "share answers" in result.reason


# ------------------------------------------------------------------------------------------------ logit lens


def test_the_lens_reveals_an_answer_hidden_after_the_last_layer(toy_models):
    """Only the last decoder layer is broken: every earlier layer reads as the vanilla model's, so the lens share is
    1 at each informative layer (the old floor, the unlearned output, made this 0 for any pair)."""
    model_v, tok, questions, _ = toy_models
    broken = copy.deepcopy(model_v)
    last = broken.model.layers[-1] if hasattr(broken, "model") else broken.transformer.h[-1]
    with torch.no_grad():
        for p in last.mlp.parameters():
            p.mul_(-8.0)
    pair = patchlab.load_pair(model_v, broken, tokenizer=tok)
    result = run("logit_lens", pair, questions)
    assert result.details["unlearned"]["accuracy"] < 0.5 * result.details["vanilla"]["accuracy"]
    assert result.score.value > 0.5 and result.verdict == "hidden"
    assert result.details["floor"] == "uniform (-log V)"


def test_a_lens_without_informative_layers_is_inconclusive(toy_models, monkeypatch):
    """A vanilla model whose lens never ranks the answers near the top before the last layer: nothing to read."""
    from patchlab.probes import logit_lens

    model_v, tok, questions, _ = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    with pytest.raises(PatchlabValueError, match="top_k"):
        run("logit_lens", pair, questions, top_k=0)
    monkeypatch.setattr(logit_lens, "informative_layers", lambda rank, k: np.zeros_like(rank, dtype=bool))
    result = run("logit_lens", pair, questions)
    assert math.isnan(result.score.value)
    assert result.verdict == "inconclusive" and "top 10" in result.reason


# ------------------------------------------------------------------------------------------------ quantization


def test_auto_picks_quanto_and_keeps_embeddings_and_head(toy_models):
    pytest.importorskip("optimum.quanto")
    model_v, *_ = toy_models
    settings = {"quantizer": "auto"}
    assert resolve_quantizer(settings, [8, 4]) == "quanto"
    assert resolve_quantizer(settings, [3]) == "rtn"  # quanto has no 3-bit weights
    with pytest.raises(PatchlabValueError, match="2, 4, 8"):
        resolve_quantizer({"quantizer": "quanto"}, [3])
    with pytest.raises(PatchlabValueError, match="quantizer must be"):
        resolve_quantizer({"quantizer": "gptq"}, [4])
    q = quantized(model_v, 4, "quanto")
    assert torch.equal(q.get_input_embeddings().weight, model_v.get_input_embeddings().weight)
    assert type(q.get_output_embeddings()) is type(model_v.get_output_embeddings())


def test_bnb_weights_are_what_bitsandbytes_layers_compute_with(toy_models):
    """The bnb quantizer's 4-bit weight is exactly the one a ``Linear4bit`` multiplies by (NF4 and FP4, no double
    quantization, as transformers' ``BitsAndBytesConfig`` defaults), its 8-bit
    weight the int8 codes ``Int8Params`` stores times their row scale; embeddings and head stay full precision."""
    bnb = pytest.importorskip("bitsandbytes")
    from patchlab.probes.quantization import bnb_weight

    model_v, *_ = toy_models
    layer = model_v.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    for quant_type in ("nf4", "fp4"):
        ref = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, quant_type=quant_type,
                                compute_dtype=torch.float32, compress_statistics=False)  # transformers' default
        ref.weight = bnb.nn.Params4bit(layer.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                       compress_statistics=False, blocksize=64)
        ref = ref.to("cpu")
        rounded = bnb_weight(layer.weight.detach(), 4, quant_type)
        assert torch.equal(torch.nn.functional.linear(x, rounded), ref(x))
        assert not torch.equal(rounded, layer.weight)
    stored = bnb.nn.Int8Params(layer.weight.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    torch.testing.assert_close(bnb_weight(layer.weight.detach(), 8), stored.CB.float() * stored.SCB[:, None] / 127,
                               rtol=1e-6, atol=0)  # the same codes and scales; float rounding of the product only
    q = quantized(model_v, 4, "bnb")
    assert torch.equal(q.get_output_embeddings().weight, model_v.get_output_embeddings().weight)
    assert torch.equal(q.model.layers[0].mlp.down_proj.weight, bnb_weight(layer.weight.detach(), 4))
    with pytest.raises(PatchlabValueError, match=r"quantizer 'bnb' quantizes weights to \(4, 8\) bits"):
        resolve_quantizer({"quantizer": "bnb"}, [8, 2])


def test_quantization_is_inconclusive_when_the_quantized_vanilla_model_loses_the_answers(toy_models, monkeypatch):
    """A quantizer that turns any model into one that never saw the concept (the retain model): the quantized vanilla
    model loses its answers, so whatever the unlearned one does is no evidence."""
    from patchlab.probes import quantization

    model_v, tok, questions, _ = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    monkeypatch.setattr(quantization, "quantized", lambda model, bits, quantizer: toy.retain())
    result = run("quantization", pair, questions, bits=[4], quantizer="rtn")
    assert result.details["levels"]["vanilla"]["accuracy"][-1][0] == 0.0
    assert result.verdict == "inconclusive" and "destroys the answers" in result.reason
    assert result.details["vanilla_nll_cost"][-1] > 0


# ------------------------------------------------------------------------------------------------ UDS


def test_uds_answer_span_scores_only_the_given_answer(toy_models):
    model_v, tok, questions, _ = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    answer = run("uds", pair, questions, retain=toy.retain(), span="answer")
    generation = run("uds", pair, questions, retain=toy.retain())
    assert answer.details["span"] == "answer" and generation.details["span"] == "generation"
    assert answer.details["full"] != generation.details["full"]  # other tokens scored
    with pytest.raises(PatchlabValueError, match="have none"):
        run("uds", pair, [QA(q.question) for q in questions], retain=toy.retain(), span="answer")
    with pytest.raises(PatchlabValueError, match="span"):
        PROBES["uds"].check(settings_for("uds", span="entity"), pair)


def test_an_undefined_uds_is_inconclusive_not_intact(toy_models):
    model_v, tok, questions, _ = toy_models
    pair = patchlab.load_pair(model_v, toy.retain(), tokenizer=tok)
    result = run("uds", pair, questions, retain=toy.retain(), threshold=1e6)
    assert math.isnan(result.score.value)
    assert result.verdict == "inconclusive" and "undefined" in result.reason


# ------------------------------------------------------------------------------------------------ null pair


def test_the_null_pair_is_intact_on_every_probe(toy_models):
    model_v, tok, questions, unrelated = toy_models
    pair = patchlab.load_pair(model_v, copy.deepcopy(model_v), tokenizer=tok)
    report = audit_many([AuditCase("null", pair, questions, unrelated, toy.retain())], progress=False,
                        settings={"common": {"n_boot": 50}, "relearning": {"steps": [0, 1]}, "krs": {"window": 3}})
    verdicts = {name: r.verdict for name, r in report.runs[0].results.items()}
    assert set(verdicts) == set(PROBES) and set(verdicts.values()) == {"intact"}, verdicts
    assert "6 intact" in report.runs[0].overall()
