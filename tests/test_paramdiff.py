"""Parameter cosine diffs: identity, localisation of a change, streaming == in-memory, errors."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import patchlab
from patchlab.analysis.paramdiff import PARAM_METRICS, one_minus_cos, paramdiff, tensor_stats, value_vector_changes


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
    assert sorted(paths) == sorted(
        ["paramdiff.json", "paramdiff.csv", "paramdiff_modules.csv"] + [f"paramdiff_layers_{m}.csv" for m in PARAM_METRICS]
        + [f"paramdiff_{m}.html" for m in PARAM_METRICS])
    layers = pd.read_csv(tmp_path / "out" / "paramdiff_layers_cosine.csv").set_index("layer")
    assert layers.loc[1, "attn_q"] == pytest.approx(-1.0)  # the negated tensor, read back from disk
    assert [p.name for p in (tmp_path / "out").glob(".*")] == [".patchlab.json"]  # no temporary file left


def _reference_one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """float64 reference: ``1 - cos = |a/|a| - b/|b||² / 2``; the difference of the unit vectors is of the size of
    the angle, so it carries no cancellation (relative error ~1e-12 at 1 - cos = 1e-10)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a / a.norm() - b / b.norm()).pow(2).sum() / 2)


@pytest.mark.parametrize("scale", [1e-3, 1e-5, 3e-6])
def test_one_minus_cos_is_exact_for_tiny_perturbations(scale):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 96, generator=gen)
    b = a + scale * a.abs().mean() * torch.randn(a.shape, generator=gen)  # float32, like a real checkpoint
    reference = _reference_one_minus_cos(a, b)
    assert 1e-13 < reference < 1e-5
    stats = tensor_stats(a, b)
    assert one_minus_cos(stats["norm_a2"], stats["norm_b2"], stats["diff2"], stats["dot_ad"]) == pytest.approx(
        reference, rel=1e-9)
    # the naive formula from the pooled dot product loses most digits at this size
    naive = 1 - stats["dot"] / (stats["norm_a2"] * stats["norm_b2"]) ** 0.5
    assert scale > 1e-4 or abs(naive - reference) > 1e-6 * reference


def test_metrics_separate_modules_that_cosine_cannot(llama):
    """Two modules changed by 1e-4 and 1e-5 relative noise: both cosines round to 1, 1 - cos, the angle and the
    relative L2 change separate them by about 100x, 10x and 10x."""
    other = copy.deepcopy(llama)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, scale in (("model.layers.0.mlp.up_proj.weight", 1e-4), ("model.layers.2.self_attn.q_proj.weight", 1e-5)):
            p = other.get_parameter(name)
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    modules = paramdiff(llama, other, progress=False).by_module().set_index("module")
    assert (modules["cosine"].round(6) == 1.0).all()
    up, q = modules.loc["mlp_up"], modules.loc["attn_q"]
    assert 30 < up["one_minus_cos"] / q["one_minus_cos"] < 300
    assert 5 < up["angle_deg"] / q["angle_deg"] < 20 and 5 < up["rel_l2"] / q["rel_l2"] < 20
    assert modules.drop(index=["mlp_up", "attn_q"])["one_minus_cos"].abs().max() < 1e-15
    # the angle is 2 asin(sqrt((1 - cos) / 2)), in degrees
    assert up["angle_deg"] == pytest.approx(np.degrees(np.arccos(1 - up["one_minus_cos"])), rel=1e-4)
    # negating a tensor: 1 - cos = 2, 180 degrees
    neg = copy.deepcopy(llama)
    with torch.no_grad():
        neg.get_parameter("model.layers.1.mlp.down_proj.weight").mul_(-1)
    flipped = paramdiff(llama, neg, progress=False)
    assert flipped.by_layer("one_minus_cos").loc[1, "mlp_down"] == pytest.approx(2.0, abs=1e-12)
    assert flipped.by_layer("angle_deg").loc[1, "mlp_down"] == pytest.approx(180.0)


def test_value_vectors_ranked_by_changes_below_float32_resolution(llama, tok):
    """Columns changed by 1e-4 and 3e-5 relative noise have 1 - cos below float32's spacing near 1 (6e-8), so
    their float32 cosines cannot be ranked: the ranking must still put the larger change first, then the smaller,
    then the untouched columns."""
    other = copy.deepcopy(llama)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = other.model.layers[2].mlp.down_proj.weight
        for col, scale in ((11, 1e-4), (5, 3e-5)):
            w[:, col] += scale * w[:, col].abs().mean() * torch.randn(w.shape[0], generator=gen)
    top = value_vector_changes(patchlab.load_pair(llama, other, tokenizer=tok), top=3, top_tokens=1)
    assert top[["layer", "index"]].values.tolist()[:2] == [[2, 11], [2, 5]]
    assert 6e-8 > top.loc[0, "one_minus_cos"] > 5 * top.loc[1, "one_minus_cos"] > 0
    assert top.loc[2, "one_minus_cos"] == 0


def test_log_heatmap_of_one_minus_cos(llama):
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.get_parameter("model.layers.3.mlp.gate_proj.weight").mul_(1.001).add_(1e-5)
    fig = paramdiff(llama, other, progress=False).heatmap()  # 1 - cos by default
    trace = fig.data[0]
    cell = list(trace.x).index("mlp_gate")
    row = list(trace.y).index(3)
    assert np.isnan(trace.z[0][0]) and trace.text[0][0] == "0"  # unchanged: blank colour, "0"
    assert -14 < trace.z[row][cell] < -4  # log10 of 1 - cos
    assert "e-" in trace.text[row][cell] and len(trace.text[row][cell]) <= 9  # 3 significant digits
    assert all(t.startswith("1e") for t in trace.colorbar.ticktext)
