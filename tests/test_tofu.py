"""TOFU / open-unlearning compatibility: TOFU-format records in JSON, JSONL and saved ``datasets`` directories, and
TOFU's likelihood metrics (answer probability, truth ratio) checked against open-unlearning's formulas."""

from __future__ import annotations

import copy
import math
import re

import datasets
import numpy as np
import pytest
import torch

import patchlab
from patchlab import toy
from patchlab.analysis.likelihood import (aggregate, closer_to_1_better, encode_qa, likelihood_values, true_better)
from patchlab.io import read_questions, read_records
from patchlab.pair.generation import format_prompts
from patchlab.toy.tofu import FORMATS, tofu_splits, write_fixture
from patchlab.unlearning import to_examples
from tests.conftest import perturbed

TOFU_FIELDS = {"question", "answer", "paraphrased_answer", "perturbed_answer"}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    return write_fixture(root / "tofu"), tofu_splits(toy.world(), toy.DEFAULT_CONCEPT)


@pytest.fixture(scope="module")
def toy_model():
    return toy.vanilla()


def test_fixture_has_tofu_fields_and_every_format_reads_back_the_same(fixture_dir):
    paths, splits = fixture_dir
    forget = splits["forget"]
    assert len(forget) == 10 and len(splits["retain"]) == 20
    for rec in forget:
        assert set(rec) == TOFU_FIELDS
        assert rec["answer"] in rec["paraphrased_answer"]
        assert len(rec["perturbed_answer"]) == 5 and rec["paraphrased_answer"] not in rec["perturbed_answer"]
        assert all(rec["answer"] not in p for p in rec["perturbed_answer"])
    for (split, fmt), path in paths.items():
        assert read_records(path) == splits[split], (split, fmt)
        assert read_questions(path) == [r["question"] for r in splits[split]]
    assert {fmt for _, fmt in paths} == set(FORMATS)


def test_forget_and_retain_sets_read_from_every_format(fixture_dir, toy_model):
    paths, splits = fixture_dir
    _, tok = toy_model
    reference = to_examples(splits["forget"], tok)
    for fmt in FORMATS:
        for spec in (paths["forget", fmt], str(paths["forget", fmt])):
            got = to_examples(spec, tok)
            assert [torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
                    for a, b in zip(got, reference)] == [True] * len(reference), fmt


def test_saved_dataset_dicts_and_other_directories(tmp_path, fixture_dir):
    _, splits = fixture_dir
    one = datasets.DatasetDict({"train": datasets.Dataset.from_list(splits["forget"])})
    one.save_to_disk(str(tmp_path / "one"))
    assert read_records(tmp_path / "one") == splits["forget"]
    two = datasets.DatasetDict({"train": one["train"], "test": one["train"]})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(patchlab.PatchlabValueError, match="splits train, test"):
        read_records(tmp_path / "two")
    assert read_records(tmp_path / "two" / "test") == splits["forget"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(patchlab.PatchlabValueError, match="not a dataset saved with save_to_disk"):
        read_questions(tmp_path / "plain")
    with pytest.raises(patchlab.PatchlabFileError):
        read_records(tmp_path / "missing.json")


def open_unlearning_avg_loss(model, tok, question: str, answer: str) -> float:
    """open-unlearning's ``evaluate_probability`` on one item: the mean cross-entropy over the answer's target
    tokens (labels -100 on the prompt), here through the model's own ``loss`` (an independent path)."""
    prompt = tok(format_prompts([question])[0]).input_ids
    ids = tok(format_prompts([question])[0] + " " + answer).input_ids + [tok.eos_token_id]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


def test_probability_and_truth_ratio_follow_open_unlearning(fixture_dir, toy_model):
    model, tok = toy_model
    forget = fixture_dir[1]["forget"][:4]
    values = likelihood_values(model, encode_qa(model, tok, forget, ["prob", "truth_ratio"]))
    for rec, prob, ratio in zip(forget, values["prob"], values["truth_ratio"]):
        assert prob == pytest.approx(math.exp(-open_unlearning_avg_loss(model, tok, rec["question"], rec["answer"])),
                                     rel=1e-5)
        correct = open_unlearning_avg_loss(model, tok, rec["question"], rec["paraphrased_answer"])
        wrong = np.mean([open_unlearning_avg_loss(model, tok, rec["question"], p) for p in rec["perturbed_answer"]])
        assert ratio == pytest.approx(np.exp(-wrong) / (np.exp(-correct) + 1e-10), rel=1e-5)
    # the toy model was trained on these facts: it answers them and prefers the true paraphrase (R < 1)
    assert min(values["prob"]) > 0.9 and max(values["truth_ratio"]) < 1


def test_tofu_aggregates():
    assert closer_to_1_better([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert true_better([0.5, 2.0, 0.0]) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert aggregate("truth_ratio", "target", [0.25]) == pytest.approx(0.25)
    assert aggregate("truth_ratio", "unrelated", [0.25]) == pytest.approx(0.75)
    assert aggregate("prob", "unrelated", [0.2, 0.4]) == pytest.approx(0.3)
    with pytest.raises(patchlab.PatchlabValueError, match="no prob value"):
        aggregate("prob", "target", [])
    with pytest.raises(patchlab.PatchlabValueError, match="choose from prob, truth_ratio"):
        aggregate("rouge", "target", [1.0])


def test_evaluate_adds_tofu_metrics_of_both_models(fixture_dir, toy_model):
    model, tok = toy_model
    _, splits = fixture_dir
    forget, retain = splits["forget"][:3], splits["retain"][:3]
    # an "unlearned" copy with noisy weights: its likelihoods differ from the vanilla model's
    damaged = perturbed(model, re.compile(r"mlp\.down_proj"), scale=2.0)
    result = patchlab.behavior.evaluate((model, damaged, tok), forget, retain, max_new_tokens=4,
                                        likelihood=("prob", "truth_ratio"))
    table = result.table
    assert result.likelihood == ("prob", "truth_ratio")
    before = likelihood_values(model, encode_qa(model, tok, forget, ["truth_ratio"]))["truth_ratio"]
    np.testing.assert_allclose(table.query("set == 'target'")["truth_ratio_before"], before, rtol=1e-6)
    assert not np.allclose(table["prob_before"], table["prob_after"])
    summary = result.summary()
    assert summary["target_truth_ratio_before"] == pytest.approx(closer_to_1_better(before))
    assert summary["unrelated_truth_ratio_after"] == pytest.approx(
        true_better(table.query("set == 'unrelated'")["truth_ratio_after"]))
    same = patchlab.behavior.evaluate((model, copy.deepcopy(model), tok), forget, retain, max_new_tokens=2,
                                      likelihood=["prob"])
    np.testing.assert_allclose(same.table["prob_before"], same.table["prob_after"], rtol=1e-6)
    assert "target_truth_ratio_after" not in same.summary()


def test_missing_tofu_fields_fail_before_any_model_work(fixture_dir, toy_model, monkeypatch):
    model, tok = toy_model
    forget = [dict(r) for r in fixture_dir[1]["forget"][:2]]
    del forget[1]["perturbed_answer"]
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before validating"))
    with pytest.raises(patchlab.PatchlabValueError, match="target item 1: 'perturbed_answer'"):
        patchlab.behavior.evaluate((model, model, tok), forget, forget, likelihood=("truth_ratio",))
    with pytest.raises(patchlab.PatchlabValueError, match="unknown likelihood metric 'bleu'"):
        patchlab.behavior.evaluate((model, model, tok), forget, forget, likelihood=("bleu",))
    with pytest.raises(patchlab.PatchlabValueError, match="unrelated item 0: 'answer'"):
        patchlab.behavior.evaluate((model, model, tok), forget, ["a plain question ?"], likelihood=("prob",))
