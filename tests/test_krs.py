"""KRS sweep: exactness on constructed pairs, batched engine == loop engine, result I/O, input errors."""

from __future__ import annotations

import copy

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import patchlab
from patchlab.pair.sites import parse_component
from patchlab.patching.engine import Row, run_rows
from patchlab.patching.loop import restore
from patchlab.patching.metrics import get_metric, mse
from patchlab.patching.sweep import position_mask
from tests.conftest import ATTN_OR_UP, DOWN, QUESTIONS, perturbed, prepared

FAMILIES = ["llama", "gpt2", "gpt_neox"]


@pytest.fixture(scope="module")
def pairs(vanilla_models, tok):
    """family -> {"attn_up": pair differing in attention + MLP up/gate, "down": pair differing in down proj}."""
    return {fam: {"attn_up": patchlab.load_pair(v, perturbed(v, ATTN_OR_UP), tokenizer=tok),
                  "down": patchlab.load_pair(v, perturbed(v, DOWN), tokenizer=tok)}
            for fam, v in vanilla_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_coef_attn_over_all_layers_recovers_everything(pairs, family):
    pair = pairs[family]["attn_up"]
    L = pair.n_layers
    res = patchlab.krs_sweep(pair, QUESTIONS, components=["coef+attn", "value"], window=L, window_mode="fixed",
                             n_tokens=6, progress=False)
    assert res.windows == [(0, L)]
    np.testing.assert_allclose(res.per_question["coef+attn"], 1.0, atol=1e-5)
    # the value vectors are identical in this pair: restoring them changes nothing
    np.testing.assert_allclose(res.per_question["value"], 0.0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_over_all_layers_recovers_down_projection_change(pairs, family):
    pair = pairs[family]["down"]
    L = pair.n_layers
    res = patchlab.krs_sweep(pair, QUESTIONS, components=["value", "attn"], window=L, window_mode="fixed",
                             n_tokens=6, progress=False)
    np.testing.assert_allclose(res.per_question["value"], 1.0, atol=1e-5)
    # partial value restoration recovers something but not everything
    part = patchlab.krs_sweep(pair, QUESTIONS, components=["value"], window=1, n_tokens=6, progress=False)
    assert np.all(part.krs["value"] < 1 - 1e-3)


def test_empty_restoration_gives_zero(pairs, tok):
    pair = pairs["llama"]["attn_up"]
    store = prepared(pair, QUESTIONS[:1], 5)
    everything = parse_component("coef+value+attn", pair.arch.sites)
    seq = len(store.ids[0])
    nowhere = Row(0, everything, (0, 0), position_mask("all", store.prompt_lens[0], seq))
    no_position = Row(0, everything, (0, pair.n_layers), torch.zeros(seq, dtype=torch.bool))
    krs = run_rows(pair.unlearned_hf, store, [nowhere, no_position], get_metric("krs"))
    torch.testing.assert_close(krs, torch.zeros(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "answer", "last_prompt"])
def test_batched_engine_equals_loop(pairs, family, positions):
    pair = pairs[family]["attn_up"]
    kw = dict(components=["coef", "value", "attn", "coef+attn", "coef+value+attn"], window=2, n_tokens=5,
              positions=positions, progress=False)
    fast = patchlab.krs_sweep(pair, QUESTIONS, batch_size=7, **kw)
    loop = patchlab.krs_sweep(pair, QUESTIONS, engine="loop", **kw)
    for comp in fast.krs:
        np.testing.assert_allclose(fast.per_question[comp], loop.per_question[comp], atol=1e-5)
    assert fast.windows == loop.windows and len(fast.windows) == pair.n_layers


def test_last_prompt_restoration_makes_first_prediction_vanilla(pairs):
    """Restoring every site in every layer at the last prompt position reproduces the vanilla logit there."""
    pair = pairs["gpt2"]["attn_up"]
    store = prepared(pair, QUESTIONS[1:2], 5)
    pos = position_mask("last_prompt", store.prompt_lens[0], len(store.ids[0]))
    logits = restore(pair, store.ids[0], "coef+attn", (0, pair.n_layers), pos)
    restored = logits[0, store.scored_positions(0)]
    vanilla = store.refs[0].vanilla
    torch.testing.assert_close(restored[0], vanilla[0], atol=1e-5, rtol=0)
    assert (restored[1:] - vanilla[1:]).abs().max() > 1e-3


def test_sliding_windows_match_the_paper():
    assert patchlab.sliding_windows(8, 5) == [(0, 3), (0, 4), (0, 5), (1, 6), (2, 7), (3, 8), (4, 8), (5, 8)]
    assert patchlab.sliding_windows(4, 2, mode="fixed") == [(0, 2), (1, 3), (2, 4)]
    assert patchlab.sliding_windows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    for bad in (0, 9, 2.5):
        with pytest.raises(patchlab.PatchlabValueError, match="window"):
            patchlab.sliding_windows(8, bad)


def test_result_roundtrip_frame_and_heatmap(pairs, tmp_path):
    pair = pairs["llama"]["attn_up"]
    res = patchlab.krs_sweep(pair, QUESTIONS[:2], components=["coef", "attn"], window=3, n_tokens=4, progress=False)
    path = res.save(tmp_path / "sub" / "krs.json")
    back = patchlab.KRSResult.load(path)
    assert back.windows == res.windows and back.questions == res.questions
    for c in res.krs:
        np.testing.assert_array_equal(back.krs[c], res.krs[c])
        np.testing.assert_allclose(res.krs[c], res.per_question[c].mean(axis=0))
    frame = res.to_frame()
    assert len(frame) == 2 * pair.n_layers and set(frame.component) == {"coef", "attn"}
    fig = res.heatmap()
    assert isinstance(fig, go.Figure)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), np.stack([res.krs["coef"], res.krs["attn"]]))
    assert "layers" in fig.data[0].text[0][0]
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))
    (tmp_path / "bad.json").write_text('{"krs": 1}')
    with pytest.raises(patchlab.PatchlabValueError, match="not a patchlab PatchResult"):
        patchlab.KRSResult.load(tmp_path / "bad.json")
    with pytest.raises(patchlab.PatchlabFileError):
        patchlab.KRSResult.load(tmp_path / "missing.json")


def test_pooled_krs_is_the_ratio_of_question_averaged_losses(pairs):
    """KRSResult.pooled() against MSEs computed directly from restored logits, one restoration at a time."""
    pair = pairs["gpt2"]["attn_up"]
    res = patchlab.krs_sweep(pair, QUESTIONS, components=["attn"], window=3, n_tokens=5, progress=False)
    store = prepared(pair, QUESTIONS, 5, sites=("attn",))
    mse_r, mse_u = np.zeros((len(QUESTIONS), len(res.windows))), []
    for q in range(len(QUESTIONS)):
        vanilla, unlearned = store.refs[q].vanilla, store.refs[q].unlearned
        mse_u.append(float(((unlearned - vanilla) ** 2).mean()))
        for w, window in enumerate(res.windows):
            logits = restore(pair, store.ids[q], "attn", window, torch.ones(len(store.ids[q]), dtype=torch.bool))
            mse_r[q, w] = float(mse(logits[:, store.scored_positions(q)], vanilla)[0])
    expected = 1 - mse_r.mean(axis=0) / np.mean(mse_u)
    np.testing.assert_allclose(res.pooled()["attn"], expected, rtol=1e-4, atol=1e-5)
    # questions weigh by how far unlearning moved them, so the two aggregates differ unless all MSE(l_u, l_v) agree
    assert np.ptp(mse_u) > 0 and not np.allclose(res.pooled()["attn"], res.krs["attn"])
    np.testing.assert_allclose(res.to_frame()["krs_pooled"], res.pooled()["attn"])
    np.testing.assert_allclose(np.asarray(res.heatmap(aggregate="pooled").data[0].z)[0], res.pooled()["attn"])
    with pytest.raises(patchlab.PatchlabValueError, match="aggregate"):
        res.heatmap(aggregate="median")


def test_sweep_input_errors(pairs, vanilla_models, tok):
    pair = pairs["llama"]["attn_up"]
    cases = [
        (dict(questions=[]), "non-empty"),
        (dict(questions=["  "]), "empty"),
        (dict(components=["mlp"]), "unknown component"),
        (dict(components=[("coef", "attn")]), "is a name"),
        (dict(components=[]), "non-empty"),
        (dict(window=pair.n_layers + 1), "window"),
        (dict(n_tokens=0), "n_tokens"),
        (dict(engine="fast!"), "engine"),
        (dict(positions="middle"), "positions"),
        (dict(prompt_template="Q: {q}"), "template"),
    ]
    for overrides, match in cases:
        kw = dict(questions=QUESTIONS, progress=False, n_tokens=3, window=2) | overrides
        with pytest.raises(patchlab.PatchlabValueError, match=match):
            patchlab.krs_sweep(pair, **kw)
    same = patchlab.load_pair(vanilla_models["llama"], perturbed(vanilla_models["llama"], DOWN, scale=0.0), tokenizer=tok)
    with pytest.raises(patchlab.DegenerateKRSError, match="undefined"):
        patchlab.krs_sweep(same, QUESTIONS, n_tokens=3, window=2, progress=False)


def test_nan_logits_are_reported(vanilla_models, tok):
    broken = perturbed(vanilla_models["gpt2"], DOWN)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    pair = patchlab.load_pair(vanilla_models["gpt2"], broken, tokenizer=tok)
    with pytest.raises(patchlab.NonFiniteError, match="unlearned logits"):
        patchlab.krs_sweep(pair, QUESTIONS, n_tokens=3, window=2, progress=False)


def test_bfloat16_models_score_in_float32_and_engines_agree(vanilla_models, tok):
    vanilla = copy.deepcopy(vanilla_models["llama"])  # load_pair converts in-memory models in place
    pair = patchlab.load_pair(vanilla, perturbed(vanilla, ATTN_OR_UP), tokenizer=tok, dtype=torch.bfloat16)
    assert next(pair.unlearned_hf.parameters()).dtype == torch.bfloat16
    kw = dict(components=["coef", "attn"], window=2, n_tokens=4, progress=False)
    fast = patchlab.krs_sweep(pair, QUESTIONS[:2], **kw)
    loop = patchlab.krs_sweep(pair, QUESTIONS[:2], engine="loop", **kw)
    for comp in fast.krs:
        assert fast.krs[comp].dtype == np.float32 and np.all(np.isfinite(fast.krs[comp]))
        np.testing.assert_allclose(fast.per_question[comp], loop.per_question[comp], atol=1e-5)
