"""The generic engine: sites as data (a registered site works in both engines and the TransformerLens adapter),
metrics as data, resid / mlp_out / per-head exactness, and the batch plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab
from patchlab.pair.sites import Site, parse_component
from patchlab.patching.engine import Row, layer_work, plan_batches, run_rows
from patchlab.patching.loop import restore
from patchlab.patching.metrics import get_metric
from patchlab.patching.sweep import position_mask
from tests.conftest import CORPUS, EVERYTHING, QUESTIONS, perturbed, prepared

FAMILIES = ["llama", "gpt2", "gpt_neox"]


def both_engines(pair, **kw):
    kw = dict(questions=QUESTIONS, n_tokens=5, progress=False) | kw
    return patchlab.patch_sweep(pair, batch_size=5, **kw), patchlab.patch_sweep(pair, engine="loop", **kw)


def assert_equal_results(a, b, atol=1e-5):
    assert a.components == b.components
    for comp in a.components:
        np.testing.assert_allclose(a.per_question[comp], b.per_question[comp], atol=atol)


@pytest.fixture
def z_site():
    """A user site in a few lines: the attention output projection's input (the heads' concatenated outputs)."""
    site = Site("z", "self_attn.o_proj", "input", "overwrite", "concatenated head outputs")
    patchlab.register_site(site, "llama")
    yield site
    patchlab.unregister_site("z", "llama")


def test_a_registered_site_works_in_both_engines_and_the_lens_adapter(vanilla_models, tok, z_site):
    vanilla = vanilla_models["llama"]
    pair = patchlab.load_pair(vanilla, perturbed(vanilla, EVERYTHING), tokenizer=tok)  # loaded after registering
    assert "z" in pair.arch.site_names
    fast, loop = both_engines(pair, components=["z", "z+coef"], window=2)
    assert_equal_results(fast, loop)
    assert np.abs(fast.scores["z"]).max() > 1e-3  # it restores something
    cache = patchlab.run_with_cache(pair, torch.tensor(tok(CORPUS[0]).input_ids)[None], sites=["z"])
    assert cache.site("z", 1).shape[-1] == vanilla.config.hidden_size
    bridge_v, bridge_u = patchlab.lens.bridge_pair(pair)
    ids = torch.tensor(tok(CORPUS[0]).input_ids)
    mask = torch.tensor([i % 2 == 1 for i in range(len(ids))])
    with torch.no_grad():
        _, tl_cache = bridge_v.run_with_cache(ids[None])
        got = bridge_u.run_with_hooks(ids[None], fwd_hooks=patchlab.lens.restore_hooks(
            tl_cache, "z", (1, 3), mask, vanilla_model=pair.vanilla_hf, bridge=bridge_u))
    torch.testing.assert_close(got, restore(pair, ids, "z", (1, 3), mask), atol=1e-4, rtol=0)


def test_site_definitions_are_checked():
    with pytest.raises(patchlab.PatchlabValueError, match="identifier"):
        Site("bad name", "mlp", "output", "overwrite")
    with pytest.raises(patchlab.PatchlabValueError, match="needs reads"):
        Site("w", "mlp.down_proj", "input", "recompute")
    with pytest.raises(patchlab.PatchlabValueError, match="already exists"):
        patchlab.register_site(Site("coef", "mlp", "output", "overwrite"), "llama")
    with pytest.raises(patchlab.PatchlabValueError, match="unknown model types"):
        patchlab.register_site(Site("q", "mlp", "output", "overwrite"), "no_such_family")
    with pytest.raises(patchlab.PatchlabValueError, match="head list"):
        parse_component("coef[1]")


def test_a_custom_metric_runs_in_both_engines(biased_pairs):
    def mean_abs_gap(restored, refs):
        """Mean |l_r - l_v| over positions and vocabulary (lower is better)."""
        return (restored.float() - refs.vanilla).abs().mean(dim=(-2, -1))

    fast, loop = both_engines(biased_pairs["llama"], components=["coef", "attn"], window=2, metric=mean_abs_gap)
    assert_equal_results(fast, loop)
    assert fast.metric == "mean_abs_gap" and fast.weights is None
    with pytest.raises(patchlab.PatchlabValueError, match="no pooled form"):
        fast.pooled()
    with pytest.raises(patchlab.PatchlabValueError, match="one score per row"):
        patchlab.patch_sweep(biased_pairs["llama"], QUESTIONS[:1], n_tokens=3, window=2, progress=False,
                             metric=lambda restored, refs: restored.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_at_every_position_of_the_last_layer_gives_krs_1(biased_pairs, family):
    pair = biased_pairs[family]
    L = pair.n_layers
    res = patchlab.krs_sweep(pair, QUESTIONS, components=["resid", "mlp_out+attn"], window=None,
                             windows=[(L - 1, L), (0, L)], n_tokens=5, progress=False)
    np.testing.assert_allclose(res.per_question["resid"], 1.0, atol=1e-5)
    # restoring both writes into the residual stream of every layer also restores everything
    np.testing.assert_allclose(res.per_question["mlp_out+attn"][:, 1], 1.0, atol=1e-5)
    assert np.all(res.per_question["mlp_out+attn"][:, 0] < 1 - 1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_restoring_every_head_equals_restoring_attn(biased_pairs, family):
    fast, loop = both_engines(biased_pairs[family], components=["attn", "heads", "heads[0,1]"], window=2)
    assert_equal_results(fast, loop)
    np.testing.assert_allclose(fast.per_question["heads"], fast.per_question["attn"], atol=1e-5)
    assert np.abs(fast.per_question["heads[0,1]"] - fast.per_question["attn"]).max() > 1e-3


def test_the_head_axis_gives_one_row_per_head(biased_pairs):
    pair = biased_pairs["llama"]
    fast, loop = both_engines(pair, components=["coef", "heads"], window=2, heads="each")
    assert fast.components == ["coef", "heads[0]", "heads[1]", "heads[2]", "heads[3]"]
    assert_equal_results(fast, loop)
    assert fast.settings["heads"] == "each"
    frame = fast.to_frame()
    assert set(frame.component) == set(fast.components)
    with pytest.raises(patchlab.PatchlabValueError, match="heads must be"):
        patchlab.patch_sweep(pair, QUESTIONS, components=["heads"], heads=[7], progress=False)


@pytest.mark.parametrize("metric", ["krs", "logprob", "kl"])
def test_recovery_metrics_are_0_at_the_unlearned_and_1_at_the_vanilla_model(biased_pairs, metric):
    pair = biased_pairs["gpt2"]
    L = pair.n_layers
    res = patchlab.patch_sweep(pair, QUESTIONS, components=["resid"], windows=[(L - 1, L)], metric=metric,
                               n_tokens=5, progress=False)
    np.testing.assert_allclose(res.per_question["resid"][:, 0], 1.0, atol=1e-4)
    empty = patchlab.patch_sweep(pair, QUESTIONS, components=["resid"], windows=[(L - 1, L)], metric=metric,
                                 positions="last_prompt", n_tokens=5, progress=False)
    # restoring only the last prompt position fixes the first answer position only
    assert np.all(empty.per_question["resid"][:, 0] < 1 - 1e-3) and np.all(empty.per_question["resid"] > 1e-3)
    assert res.weights is not None and np.all(res.weights != 0)
    np.testing.assert_allclose(res.pooled()["resid"], 1.0, atol=1e-4)


def test_top1_of_the_vanilla_logits_is_1(biased_pairs):
    pair = biased_pairs["llama"]
    L = pair.n_layers
    res = patchlab.patch_sweep(pair, QUESTIONS, components=["resid"], windows=[(L - 1, L)], metric="top1",
                               n_tokens=5, progress=False)
    np.testing.assert_allclose(res.per_question["resid"], 1.0)  # the answers are the vanilla greedy ones
    metric = get_metric("top1")
    assert metric.denominator is None


def test_unknown_metric_and_sweep_arguments(biased_pairs):
    pair = biased_pairs["llama"]
    with pytest.raises(patchlab.PatchlabValueError, match="unknown metric 'nope'"):
        patchlab.patch_sweep(pair, QUESTIONS, metric="nope", progress=False)
    with pytest.raises(patchlab.PatchlabValueError, match="not both"):
        patchlab.patch_sweep(pair, QUESTIONS, window=2, windows=[(0, 1)], progress=False)
    with pytest.raises(patchlab.PatchlabValueError, match="layer ranges"):
        patchlab.patch_sweep(pair, QUESTIONS, windows=[(2, 1)], progress=False)
    with pytest.raises(patchlab.PatchlabValueError, match="already registered"):
        patchlab.register_metric("krs", lambda r, refs: r.sum((-2, -1)))
    with pytest.raises(patchlab.PatchlabValueError, match="krs_sweep scores KRS"):
        patchlab.krs_sweep(pair, QUESTIONS, metric="kl")


def _rows(lengths, windows, comps=("coef", "attn")):
    return [Row(q, parse_component(c), w, torch.ones(n, dtype=torch.bool))
            for q, n in enumerate(lengths) for c in comps for w in windows]


def test_batches_group_rows_by_first_layer_across_questions():
    windows = patchlab.sliding_windows(8, 5)
    lengths = [12, 12, 12, 12]
    rows = _rows(lengths, windows)
    batches = plan_batches(rows, lengths, 8, batch_size=64, mix_layers=False)
    for batch in batches:  # a forward pass never starts below the first layer of any of its rows
        assert len({rows[r].first_layer for r in batch}) == 1
        assert len({rows[r].question for r in batch}) > 1 or len(batch) < 8
    assert sorted(r for b in batches for r in b) == list(range(len(rows)))
    executed, minimum = layer_work(rows, batches, lengths, 8)
    assert executed == minimum  # equal lengths: no padding, no layer below a row's window
    ragged = [9, 17, 12, 30]
    padded, least = layer_work(_rows(ragged, windows), plan_batches(_rows(ragged, windows), ragged, 8, 64,
                                                                    mix_layers=False), ragged, 8)
    assert least < padded <= 1.1 * least  # padding costs something, bounded by max_extra
    one_question_per_pass = [list(range(q * 16, (q + 1) * 16)) for q in range(4)]
    assert layer_work(rows, one_question_per_pass, lengths, 8)[0] > 1.3 * minimum  # the old plan: from layer 0
    mixed = plan_batches(rows, lengths, 8, batch_size=256)  # neighbouring first layers share passes, within 10%
    assert len(mixed) < len(batches) and layer_work(rows, mixed, lengths, 8)[0] <= 1.1 * minimum
    assert any(len({rows[r].first_layer for r in batch}) > 1 for batch in mixed)


def test_rows_of_several_first_layers_share_a_pass_exactly(biased_pairs):
    """The plan GPUs use: a pass starts at its lowest first layer and the other rows run the layers below their
    window unpatched; the scores equal one-first-layer passes and the loop engine."""
    pair = biased_pairs["gpt2"]
    comps = [parse_component(c) for c in ("coef", "value+attn", "heads[1]")]
    store = prepared(pair, QUESTIONS, 4, sites=("coef", "attn", "heads"))
    rows = [Row(q, c, w, position_mask("all", store.prompt_lens[q], len(store.ids[q])))
            for q in range(len(QUESTIONS)) for c in comps for w in patchlab.sliding_windows(pair.n_layers, 2)]
    mixed = run_rows(pair.unlearned_hf, store, rows, get_metric("krs"), batch_size=256, mix_layers=True)
    apart = run_rows(pair.unlearned_hf, store, rows, get_metric("krs"), batch_size=256, mix_layers=False)
    torch.testing.assert_close(mixed, apart, atol=1e-5, rtol=0)
    for row, value in list(zip(rows, mixed))[::5]:
        logits = restore(pair, store.ids[row.question], row.component, row.window, row.positions)
        expected = get_metric("krs")(logits[0, store.scored_positions(row.question)], store.refs[row.question])
        torch.testing.assert_close(value, expected[0], atol=1e-5, rtol=0)


def test_position_rules():
    assert position_mask("all", 2, 4).tolist() == [True] * 4
    assert position_mask("answer", 2, 4).tolist() == [False, False, True, True]
    assert position_mask("last_prompt", 2, 4).tolist() == [False, True, False, False]
    with pytest.raises(patchlab.PatchlabValueError, match="positions"):
        position_mask("middle", 2, 4)
