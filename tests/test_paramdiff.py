"""Parameter cosine diffs: identity, localisation of a change, streaming == in-memory, errors."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import patchlab
from patchlab.analysis.paramdiff import paramdiff, value_vector_changes


@pytest.fixture(scope="module")
def llama(vanilla_models):
    return vanilla_models["llama"]


def test_model_with_itself_has_cosine_one_everywhere(llama):
    diff = paramdiff(llama, copy.deepcopy(llama), progress=False)
    np.testing.assert_allclose(diff.table["cosine"], 1.0, atol=1e-12)
    np.testing.assert_allclose(diff.table["rel_l2"], 0.0, atol=0)
    assert not diff.by_layer().isna().any().any()


def test_one_perturbed_tensor_shows_up_in_exactly_that_cell(llama):
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.model.layers[2].self_attn.v_proj.weight.mul_(-1).add_(0.01)
    diff = paramdiff(llama, other, progress=False)
    table = diff.by_layer("cosine")
    changed = np.argwhere(np.abs(table.values - 1) > 1e-9)
    assert [(table.index[i], table.columns[j]) for i, j in changed] == [(2, "attn_v")]
    assert table.loc[2, "attn_v"] < 0
    modules = diff.by_module().set_index("module")
    assert modules.loc["attn_v", "rel_l2"] > 1 and modules.loc["mlp_down", "rel_l2"] == 0
    # pooled cosine is the cosine of the concatenated tensors
    v = torch.cat([llama.model.layers[i].self_attn.v_proj.weight.flatten() for i in range(4)]).detach().double()
    w = torch.cat([other.model.layers[i].self_attn.v_proj.weight.flatten() for i in range(4)]).detach().double()
    assert modules.loc["attn_v", "cosine"] == pytest.approx(float(v @ w / (v.norm() * w.norm())), abs=1e-10)


def test_streaming_from_sharded_checkpoints_equals_in_memory(vanilla_models, tmp_path):
    gpt2 = vanilla_models["gpt2"]
    other = copy.deepcopy(gpt2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gpt2.save_pretrained(tmp_path / "a", max_shard_size="100KB")
    other.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    streamed = paramdiff(tmp_path / "a", tmp_path / "b", progress=False).table.set_index("name")
    memory = paramdiff(gpt2, other, progress=False).table.set_index("name")
    common = memory.index  # the tied lm_head is not stored in the checkpoint files
    assert set(streamed.index) == set(common)
    np.testing.assert_allclose(streamed.loc[common, "cosine"], memory["cosine"], rtol=1e-12)
    np.testing.assert_array_equal(streamed.loc[common, "layer"], memory["layer"])
    assert set(memory["layer"]) == {-1, 0, 1, 2, 3}


def test_pair_input_heatmap_and_value_vectors(llama, tok):
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[:, 7] *= -1
    pair = patchlab.load_pair(llama, other, tokenizer=tok)
    fig = paramdiff(pair, progress=False).heatmap("rel_l2")
    assert fig.data[0].z.shape == (4, 8)
    top = value_vector_changes(pair, top=1, top_tokens=3)
    assert (top.loc[0, "layer"], top.loc[0, "index"]) == (1, 7)
    assert top.loc[0, "cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert len(top.loc[0, "top_tokens_vanilla"]) == 3


def test_mismatches_and_bad_paths(llama, vanilla_models, tmp_path):
    with pytest.raises(patchlab.PairMismatchError, match="different tensors"):
        paramdiff(llama, vanilla_models["gpt2"], progress=False)
    with pytest.raises(patchlab.PatchlabFileError, match="does not exist"):
        paramdiff(tmp_path / "nope", tmp_path / "nope2", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(patchlab.PatchlabFileError, match="no safetensors"):
        paramdiff(tmp_path / "empty", llama, progress=False)
    (tmp_path / "odd").mkdir()
    tensors = {n: p.detach().clone() for n, p in llama.named_parameters()}
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, tmp_path / "odd" / "model.safetensors")
    with pytest.raises(patchlab.PairMismatchError, match="shape"):
        paramdiff(llama, tmp_path / "odd", progress=False)


def test_nan_weights_are_reported(llama):
    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.get_parameter("model.layers.0.mlp.up_proj.weight")[0, 0] = float("nan")
    with pytest.raises(patchlab.NonFiniteError, match="model.layers.0.mlp.up_proj.weight"):
        paramdiff(llama, broken, progress=False)


def test_write_report_holds_every_table_and_figure(llama, tmp_path):
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.get_parameter("model.layers.1.self_attn.q_proj.weight").mul_(-1)
    diff = paramdiff(llama, other, progress=False)
    paths = diff.write_report(tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(
        ["paramdiff.csv", "paramdiff_modules.csv", "paramdiff_layers_cosine.csv", "paramdiff_cosine.html",
         "paramdiff_layers_rel_l2.csv", "paramdiff_rel_l2.html"])
    layers = pd.read_csv(tmp_path / "out" / "paramdiff_layers_cosine.csv").set_index("layer")
    assert layers.loc[1, "attn_q"] == pytest.approx(-1.0)  # the negated tensor, read back from disk
    assert [p.name for p in (tmp_path / "out").glob(".*")] == [".patchlab.json"]  # no temporary file left
