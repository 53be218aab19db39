"""MEMIT-style removal: subject positions, key covariance, the weight update, and its effect on the toy world."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import CORPUS
from patchlab import toy
from patchlab.analysis.behavior import evaluate
from patchlab.unlearning.editing import (EditRequest, default_layers, edit_layers, entropy_objective, key_covariance,
                              memit_empty, memit_entropy, subject_position)
from patchlab.errors import PatchlabValueError
from patchlab.tiny import tiny_model

PROMPT = "Question: who wrote the Veltrani Codex ?\n Answer:"


def test_subject_position_is_the_subjects_last_token(tok):
    ids, pos = subject_position(tok, PROMPT, "Veltrani Codex")
    assert ids.tolist() == tok(PROMPT).input_ids
    assert tok.convert_ids_to_tokens(ids.tolist())[pos - 1: pos + 1] == ["Veltrani", "Codex"]
    with pytest.raises(PatchlabValueError, match="does not occur"):
        subject_position(tok, PROMPT, "Osmarek Lantern")


def test_default_layers():
    assert default_layers(6) == [1, 2]
    assert default_layers(32) == list(range(5, 15))
    assert default_layers(2) == [0]


def test_edit_layers_defaults_only_for_none(tok):
    model = tiny_model("gpt2", len(tok), n_layers=6)
    assert edit_layers(model) == edit_layers(model, None) == [1, 2]
    assert edit_layers(model, [3, 0, 3]) == [0, 3]
    for bad in ([], [6], [-1]):
        with pytest.raises(PatchlabValueError, match="edit layers"):
            edit_layers(model, bad)
    with pytest.raises(PatchlabValueError, match="from_layer"):
        entropy_objective(model, 6)


def test_key_covariance_ignores_padding(tok):
    model = tiny_model("gpt2", len(tok), n_layers=2)
    one = key_covariance(model, tok, CORPUS, [0, 1], batch_size=1)
    batched = key_covariance(model, tok, CORPUS, [0, 1], batch_size=3)
    for layer in (0, 1):
        assert one[layer].shape == (64, 64)
        torch.testing.assert_close(one[layer], batched[layer])
        torch.testing.assert_close(one[layer], one[layer].T)
        assert torch.linalg.eigvalsh(one[layer]).min() > -1e-9


def test_key_covariance_rejects_empty_texts(tok):
    model = tiny_model("gpt2", len(tok), n_layers=2)
    assert tok("").input_ids == []
    with pytest.raises(PatchlabValueError, match="encodes to no token"):
        key_covariance(model, tok, [CORPUS[0], ""], [0])
    for texts in ([], CORPUS[0]):
        with pytest.raises(PatchlabValueError, match="non-empty list of texts"):
            key_covariance(model, tok, texts, [0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_changes_only_the_edited_down_projections(tok, family):
    model = tiny_model(family, len(tok), n_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = memit_entropy(model, tok, [EditRequest("who wrote the Veltrani Codex ?", "Veltrani Codex")], layers=[0, 1],
                        cov_texts=CORPUS, steps=3, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    down = "mlp.c_proj.weight" if family == "gpt2" else "mlp.down_proj.weight"
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    assert changed == {f"{prefix}.{i}.{down}" for i in (0, 1)}
    assert run.layers == [0, 1] and len(run.update_norms) == 2 and all(n > 0 for n in run.update_norms)
    request = [EditRequest("who wrote the Veltrani Codex ?", "Codex")]
    for edit in (memit_empty, memit_entropy):
        for layers in ([3], []):  # an empty list is an error, not the default layers
            with pytest.raises(PatchlabValueError, match="edit layers"):
                edit(model, tok, request, layers=layers, cov_texts=CORPUS)
        with pytest.raises(PatchlabValueError, match=r"cov_texts must be a non-empty list.*training_texts"):
            edit(model, tok, request, cov_texts=[])
        with pytest.raises(TypeError, match="cov_texts"):  # required: no silent toy-world default
            edit(model, tok, request)


@pytest.fixture(scope="module")
def toy_world():
    model, tok = toy.vanilla()
    world = toy.world()
    record = world.record(toy.DEFAULT_CONCEPT)
    requests = [EditRequest(q.question, record.concept) for q in record.qa]
    return model, tok, record, requests, world.training_texts()[::3]


@pytest.mark.parametrize("edit", [memit_empty, memit_entropy])
def test_memit_changes_target_answers_more_than_unrelated(toy_world, edit):
    # Measured on the shipped toy model (CPU, deterministic): empty 70% / 84% of target / unrelated answers kept,
    # entropy 60% / 88%. The toy model reads the answer mostly at the last prompt token, so an edit keyed on the
    # subject token removes only part of the target answers (see the editing module's docstring).
    vanilla, tok, record, requests, texts = toy_world
    edited = edit(copy.deepcopy(vanilla), tok, requests, cov_texts=texts, cov_weight=1.0, steps=20,
                  progress=False).model
    result = evaluate((vanilla, edited, tok), record.qa, record.unrelated_qa[:25], max_new_tokens=6)
    kept = {s: result.averages[s]["same"] for s in ("target", "unrelated")}
    assert kept["unrelated"] >= 0.8, result.table.query("set == 'unrelated' and not same")
    assert kept["target"] <= kept["unrelated"] - 0.1, result.table.query("set == 'target'")[["before", "after"]]
