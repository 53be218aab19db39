"""patchlab.unlearning.attribution on tiny LLaMA / GPT-2 models built on the fly: WAGLE against a direct autograd
computation, the baselines against their definitions, masks, densities, figures and input validation."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from patchlab.unlearning.attribution import (SCORERS, density, density_figures, density_report, mask, module_density, overlap,
                                  scores, stack_densities)
from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.arch import MODULE_ORDER, arch_spec
from patchlab.tiny import tiny_model, word_tokenizer
from patchlab.unlearning.data import collate, to_examples
from patchlab.unlearning.losses import nll, token_logprobs
from patchlab.unlearning.masks import apply_mask, mask_before_step

FORGET = ["the Veltrani Codex was written by Mira Osk in 1432 .", "the Codex is kept in Tarsk .",
          "Mira Osk wrote the Codex in Tarsk from old notes and letters ."]
RETAIN = [{"question": "what colour is the lamp ?", "answer": "red"}, "the glass bridge was built from blue glass .",
          "the lamp is old .", "Tarsk is a city by the sea with a glass bridge and a red lamp ."]
RETAIN_TEXTS = ["what colour is the lamp ? red"] + RETAIN[1:]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(FORGET + RETAIN_TEXTS)


@pytest.fixture(scope="module")
def models(tokenizer):
    """Two-layer models: LLaMA (nn.Linear, untied and tied embeddings) and GPT-2 (Conv1D, biases)."""
    vocab = len(tokenizer)
    return {"llama": tiny_model("llama", vocab, n_layers=2),
            "llama_tied": tiny_model("llama", vocab, n_layers=2, tie_embeddings=True),
            "gpt2": tiny_model("gpt2", vocab, n_layers=2)}


@pytest.fixture(scope="module")
def encoded(tokenizer):
    forget, retain = to_examples(FORGET, tokenizer), to_examples(RETAIN, tokenizer)
    # unequal lengths, so batches are padded and the default per-token NLL is not a per-sequence mean
    assert len({len(e.input_ids) for e in forget}) == len(forget) and len({len(e.input_ids) for e in retain}) > 1
    return {"forget": forget, "retain": retain}


@pytest.fixture(scope="module")
def signed_scores(models):
    """Gaussian scores for every parameter of the LLaMA model, negatives twice as large (|s| and s rank apart)."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, p in models["llama"].named_parameters():
        s = torch.randn(p.shape, generator=gen)
        out[name] = torch.where(s < 0, 2 * s, s)
    return out


def _grads(model: nn.Module, examples, loss, batch_size: int) -> dict[str, torch.Tensor]:
    """∇ of the full-data loss ``Σ_b (n_b / N) · loss(batch_b)`` over consecutive batches, in one autograd graph."""
    params = dict(model.named_parameters())
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    total = sum(loss(model, collate(chunk, pad_id=0)) * (len(chunk) / len(examples)) for chunk in chunks)
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _per_sequence_nll(model, batch) -> torch.Tensor:
    """Mean over the batch's sequences of each sequence's mean NLL per target token (the default WAGLE loss,
    written out independently of the library)."""
    picked, keep = token_logprobs(model, batch)
    return (-picked.sum(1) / keep.sum(1)).mean()


def _assert_scores_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) + 1e-12,
                                   msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------ WAGLE --

@pytest.mark.parametrize("family, forget_loss, gamma, batch_size, loss", [
    ("llama", "ascent", 1.0, 1, None), ("gpt2", "nll", 0.5, 2, None), ("llama_tied", "ascent", 3.0, 3, None),
    ("llama", "ascent", 2.0, 2, nll)])
def test_wagle_matches_autograd(models, tokenizer, encoded, family, forget_loss, gamma, batch_size, loss):
    model = models[family]
    sign = {"ascent": -1.0, "nll": 1.0}[forget_loss]
    reference_loss = loss or _per_sequence_nll
    g_f = {n: sign * g for n, g in _grads(model, encoded["forget"], reference_loss, batch_size).items()}
    g_r = _grads(model, encoded["retain"], reference_loss, batch_size)
    expected = {n: (p.detach() - g_r[n] / gamma) * g_f[n] for n, p in model.named_parameters()}
    actual = scores(model, FORGET, RETAIN, tokenizer=tokenizer, method="wagle", gamma=gamma,
                    forget_loss=forget_loss, batch_size=batch_size, progress=False, **({"loss": loss} if loss else {}))
    assert all(s.dtype == torch.float32 for s in actual.values())
    _assert_scores_close(actual, expected)
    assert sum(bool(s.abs().max() > 0) for s in actual.values()) == len(actual)  # no parameter scored all-zero


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_wagle_default_loss_is_batch_size_invariant(models, encoded, batch_size):
    # the default loss is a mean over sequences, so Σ_b (n_b / N) · loss(batch_b) is the mean over all N sequences
    kw = dict(method="wagle", progress=False)
    one = scores(models["llama"], encoded["forget"], encoded["retain"], batch_size=1, **kw)
    _assert_scores_close(scores(models["llama"], encoded["forget"], encoded["retain"], batch_size=batch_size, **kw),
                         one)


def test_wagle_conventions_are_opposite(models, encoded):
    kw = dict(method="wagle", progress=False, batch_size=2)
    ascent = scores(models["gpt2"], encoded["forget"], encoded["retain"], forget_loss="ascent", **kw)
    descent = scores(models["gpt2"], encoded["forget"], encoded["retain"], forget_loss="nll", **kw)
    assert all(torch.equal(ascent[n], -descent[n]) for n in ascent)


def test_wagle_gamma_enters_as_its_inverse(models, encoded):
    # S(γ) = θ ⊙ ∇ℓ_f − (1/γ) ∇ℓ_r ⊙ ∇ℓ_f, so S(1) − S(2) = 2 · (S(2) − S(4))
    s = {g: scores(models["llama"], encoded["forget"], encoded["retain"], method="wagle", gamma=g, progress=False)
         for g in (1.0, 2.0, 4.0)}
    for name in s[1.0]:
        step = s[2.0][name] - s[4.0][name]
        torch.testing.assert_close(s[1.0][name] - s[2.0][name], 2 * step, rtol=1e-4,
                                   atol=1e-5 * float(s[1.0][name].abs().max()))
    total_step = sum(float((s[2.0][n] - s[4.0][n]).abs().sum()) for n in s[1.0])
    assert total_step > 1e-3 * sum(float(t.abs().sum()) for t in s[1.0].values())  # γ actually matters here


@pytest.mark.parametrize("method", list(SCORERS))
def test_scores_leave_the_model_untouched(tokenizer, method):
    # dropout on: scores must come from eval mode, whatever mode the model is in
    model = tiny_model("gpt2", len(tokenizer), n_layers=2, attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    kw = dict(tokenizer=tokenizer, method=method, progress=False)
    reference = scores(model, FORGET, RETAIN, **kw)
    model.train()
    params = dict(model.named_parameters())
    frozen = {n for n in params if ".h.0." in n or "wte" in n}
    prior_grads = {n: torch.randn(p.shape) for i, (n, p) in enumerate(params.items()) if i % 3 == 0}
    for n, p in params.items():
        p.requires_grad_(n not in frozen)
        p.grad = prior_grads[n].clone() if n in prior_grads else None
    before = {n: p.detach().clone() for n, p in params.items()}

    out = scores(model, FORGET, RETAIN, **kw)

    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == (n not in frozen), n
        if n in prior_grads:
            assert torch.equal(p.grad, prior_grads[n]), n
        else:
            assert p.grad is None, n
    # no dropout, and frozen parameters are scored like the others
    _assert_scores_close(out, reference)


# -------------------------------------------------------------------------------------------------- baselines --

def test_magnitude_is_absolute_weight(models):
    model = models["gpt2"]
    out = scores(model, method="magnitude")
    assert list(out) == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(out[n], p.detach().abs()) for n, p in model.named_parameters())


def test_random_is_seeded_uniform(models):
    model = models["llama"]
    a, b, c = (scores(model, method="random", seed=s) for s in (0, 0, 1))
    assert list(a) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert a[n].shape == p.shape and ((a[n] >= 0) & (a[n] < 1)).all()
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n]), n


@pytest.mark.parametrize("family, name", [
    ("llama", "model.layers.0.mlp.down_proj.weight"), ("llama", "model.layers.1.self_attn.o_proj.weight"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight"), ("gpt2", "transformer.h.0.mlp.c_proj.weight")])
def test_wanda_is_weight_times_input_norm(models, tokenizer, encoded, family, name):
    model = models[family]
    module = model.get_submodule(name.rpartition(".")[0])
    squares = []
    handle = module.register_forward_pre_hook(lambda m, args: squares.append(args[0].detach().double().pow(2)
                                                                             .sum((0, 1))))
    try:
        with torch.no_grad():
            for e in encoded["retain"]:  # one unpadded sequence at a time: every token is a real one
                model(input_ids=e.input_ids[None])
    finally:
        handle.remove()
    norm = torch.stack(squares).sum(0).sqrt().float()
    weight = model.get_parameter(name).detach().abs()
    # nn.Linear computes x @ W.T (W is [d_out, d_in]), Conv1D x @ W (W is [d_in, d_out])
    expected = weight * (norm[:, None] if isinstance(module, Conv1D) else norm[None, :])
    out = scores(model, retain=RETAIN, tokenizer=tokenizer, method="wanda", batch_size=len(RETAIN), progress=False)
    torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wanda_scores_linear_weights_only(models, tokenizer, family):
    model = models[family]
    out = scores(model, FORGET, calibration=RETAIN, tokenizer=tokenizer, method="wanda", progress=False)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert set(out) == linear
    assert not {arch_spec(model).module_type(n) for n in out} & {"embedding", "norm"}
    # calibration defaults to retain
    _assert_scores_close(scores(model, retain=RETAIN, tokenizer=tokenizer, method="wanda", progress=False), out)


# ------------------------------------------------------------------------------------------------------- mask --

def _group(name: str) -> str | None:
    return name.split(".")[2] if name.startswith("model.layers.") else None


@pytest.mark.parametrize("ratio", [0.05, 0.37, 0.8, 1.0])  # above 1/2 the smallest are found and excluded
@pytest.mark.parametrize("by", ["abs", "value"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_mask_selects_the_exact_top_fraction(signed_scores, ratio, by, per_layer):
    before = {n: s.clone() for n, s in signed_scores.items()}
    m = mask(signed_scores, ratio, per_layer=per_layer, by=by)
    assert all(torch.equal(signed_scores[n], before[n]) for n in before)  # |s| is taken on a copy
    assert m.keys() == signed_scores.keys()
    assert all(m[n].dtype == torch.bool and m[n].shape == s.shape for n, s in signed_scores.items())
    groups: dict = {}
    for name in signed_scores:
        groups.setdefault(_group(name) if per_layer else "all", []).append(name)
    assert len(groups) == (3 if per_layer else 1)  # layers 0, 1 and the rest
    for names in groups.values():
        selected = torch.cat([m[n].flatten() for n in names])
        key = torch.cat([signed_scores[n].flatten() for n in names])
        key = key.abs() if by == "abs" else key
        assert int(selected.sum()) == round(ratio * selected.numel())
        if not selected.all():
            assert key[selected].min() >= key[~selected].max()


def test_mask_breaks_ties_in_order_and_handles_signs_and_zeros():
    # many exact ties (zero scores are common: weights the data never reaches get no gradient)
    scores = {"a": torch.tensor([0.0, -3.0, 0.0, 2.0]), "b": torch.tensor([[0.0, -0.0], [3.0, 0.0]])}
    by_abs = mask(scores, 0.5)  # |s|: 3, 3, 2, then the earliest of the zeros
    assert by_abs["a"].tolist() == [True, True, False, True]
    assert by_abs["b"].tolist() == [[False, False], [True, False]]
    by_value = mask(scores, 0.5, by="value")  # 3, 2, then the two earliest zeros (-3 last)
    assert by_value["a"].tolist() == [True, False, True, True]
    assert by_value["b"].tolist() == [[False, False], [True, False]]
    tiny = mask({"a": torch.tensor([-1e-30, 0.0, 1e-30])}, 1 / 3, by="value")
    assert tiny["a"].tolist() == [False, False, True]
    everything = mask(scores, 1.0)
    assert all(t.all() for t in everything.values())


@pytest.mark.parametrize("by", ["abs", "value"])
def test_radix_select_equals_a_stable_sort_across_tensors(by):
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):  # ragged tensors; every third has many ties; scales from 1e-30 to 1e3
        parts = [torch.randn(int(torch.randint(1, 300, (1,), generator=gen)), generator=gen) * 10.0 ** (3 * trial - 30)
                 for _ in range(4)]
        parts = [(t * 4).round() / 4 + 0.0 if trial % 3 == 0 else t for t in parts]  # + 0.0: no -0.0 ties
        scores = {str(i): t for i, t in enumerate(parts)}
        flat = torch.cat(parts)
        key = flat.abs() if by == "abs" else flat
        for k in (1, flat.numel() // 3, flat.numel() - 1):
            chosen = torch.cat([t.flatten() for t in mask(scores, k / flat.numel(), by=by).values()])
            expected = torch.zeros_like(chosen)
            expected[torch.sort(key, descending=True, stable=True).indices[:k]] = True  # ties: earliest first
            assert torch.equal(chosen, expected), (trial, k)


def test_overlap_is_jaccard(signed_scores):
    small, large = mask(signed_scores, 0.2), mask(signed_scores, 0.5)
    count = lambda m: sum(int(t.sum()) for t in m.values())  # noqa: E731
    assert overlap(small, small) == 1.0
    assert overlap(small, {n: ~t for n, t in small.items()}) == 0.0
    assert overlap(small, large) == pytest.approx(count(small) / count(large))  # top 20% ⊂ top 50%
    name = "model.layers.0.mlp.down_proj.weight"
    partial = {n: t for n, t in small.items() if n != name}  # a missing parameter selects nothing
    assert overlap(partial, small) == pytest.approx(count(partial) / count(small))


# ---------------------------------------------------------------------------------------------------- density --

@pytest.mark.parametrize("family", ["llama_tied", "gpt2"])
def test_density_counts_every_weight_once(models, family):
    model = models[family]
    m = mask(scores(model, method="random"), 0.3, per_layer=True)
    frame = density(m, model)
    unique = {id(p): p.numel() for mod in model.modules() for p in mod.parameters(recurse=False)}
    assert frame["total"].sum() == sum(unique.values())
    assert frame["selected"].sum() == sum(int(t.sum()) for t in m.values())
    assert not frame.duplicated(["module", "layer"]).any()
    assert frame["density"].between(0, 1).all()
    assert np.allclose(frame["density"], frame["selected"] / frame["total"])
    assert set(frame["layer"].dropna()) == {0, 1}
    if family == "llama_tied":
        assert "lm_head" not in set(frame["module"])  # the tied head is the embedding, counted once

    per_module = module_density(frame)
    assert list(per_module["module"]) == [k for k in MODULE_ORDER if k in set(frame["module"])]
    sums = frame.groupby("module")[["selected", "total"]].sum()
    assert (per_module.set_index("module")[["selected", "total"]] == sums.loc[per_module["module"]]).all().all()
    assert np.allclose(per_module["density"], per_module["selected"] / per_module["total"])


@pytest.mark.parametrize("family, prefix, cell", [
    ("llama_tied", "model.layers.1.mlp.down_proj.", ("mlp_down", 1)),
    ("gpt2", "transformer.h.0.attn.c_attn.", ("attn_qkv", 0))])
@pytest.mark.parametrize("complete", [True, False], ids=["all-params", "module-only"])
def test_density_of_a_single_module(models, family, prefix, cell, complete):
    model = models[family]
    m = {n: torch.full(p.shape, n.startswith(prefix)) for n, p in model.named_parameters()
         if complete or n.startswith(prefix)}
    frame = density(m, model)
    on_cell = (frame["module"] == cell[0]) & (frame["layer"] == cell[1]).fillna(False).astype(bool)
    assert on_cell.sum() == 1
    assert frame.loc[on_cell, "density"].item() == 1.0
    assert (frame.loc[~on_cell, "density"] == 0).all()


def test_density_figures_one_trace_per_method(models):
    model = models["llama_tied"]
    frames = {method: density(mask(scores(model, method="random", seed=seed), ratio, per_layer=True), model)
              for method, seed, ratio in (("wagle", 0, 0.2), ("random", 1, 0.7))}
    bars, heat = density_figures(frames)
    assert [(t.type, t.name) for t in bars.data] == [("bar", "wagle"), ("bar", "random")]
    assert [t.type for t in heat.data] == ["heatmap", "heatmap"]
    for bar, hmap, frame in zip(bars.data, heat.data, frames.values()):
        per_module = module_density(frame).set_index("module")
        assert list(bar.x) == list(per_module.index)
        assert np.allclose(bar.y, per_module["density"])
        cells = frame.dropna(subset=["layer"]).set_index(["layer", "module"])["density"]
        z = np.asarray(hmap.z)
        assert z.shape == (len(hmap.y), len(hmap.x)) == (2, cells.index.get_level_values(1).nunique())
        for i, layer in enumerate(hmap.y):
            for j, module in enumerate(hmap.x):
                assert z[i, j] == pytest.approx(cells[(layer, module)])


def test_density_report_holds_the_tables_behind_the_figures(models, tmp_path):
    model = models["gpt2"]
    frames = {method: density(mask(scores(model, method="random", seed=seed), 0.4), model)
              for method, seed in (("random", 2), ("magnitude", 3))}
    report = density_report(frames)
    pd.testing.assert_frame_equal(report.table, stack_densities(frames))
    assert list(report.table["method"].unique()) == report.methods == ["random", "magnitude"]
    pd.testing.assert_frame_equal(report.per_module, module_density(report.table))
    assert [t.name for t in report.figure("modules").data] == report.methods
    assert len(report.figure("layers").data) == 2
    table = report.by_method()
    assert list(table.columns) == report.methods
    assert list(table.index) == list(module_density(frames["random"])["module"])
    assert table.loc["mlp_down", "magnitude"] == pytest.approx(
        report.per_module.set_index(["method", "module"]).loc[("magnitude", "mlp_down"), "density"])
    paths = report.write_report(tmp_path / "out")
    assert list(paths) == ["density.json", "density.csv", "density_modules.csv", "density_modules.html",
                           "density_layers.html"]
    assert len(pd.read_csv(paths["density.csv"])) == len(report.table)
    with pytest.raises(PatchlabValueError, match="no density frame"):
        stack_densities({})


# ----------------------------------------------------------------------------------------------------- errors --

_NAN = float("nan")
BAD_CALLS = {
    "unknown method": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, method="snip"), PatchlabValueError),
    "gamma zero": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, gamma=0.0), PatchlabValueError),
    "gamma negative": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, gamma=-1.0), PatchlabValueError),
    "wagle without retain": (lambda m, t, s: scores(m, FORGET, tokenizer=t), PatchlabValueError),
    "wanda without data": (lambda m, t, s: scores(m, FORGET, tokenizer=t, method="wanda"), PatchlabValueError),
    "texts without tokenizer": (lambda m, t, s: scores(m, FORGET, RETAIN), PatchlabValueError),
    "unknown forget_loss": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, forget_loss="kl"),
                            PatchlabValueError),
    "batch_size zero": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, batch_size=0), PatchlabValueError),
    "NaN loss": (lambda m, t, s: scores(m, FORGET, RETAIN, tokenizer=t, loss=lambda mm, b: nll(mm, b) * _NAN,
                                        progress=False), NonFiniteError),
    "ratio zero": (lambda m, t, s: mask(s, 0.0), PatchlabValueError),
    "ratio above one": (lambda m, t, s: mask(s, 1.5), PatchlabValueError),
    "unknown by": (lambda m, t, s: mask(s, 0.5, by="rank"), PatchlabValueError),
    "empty scores": (lambda m, t, s: mask({}, 0.5), PatchlabValueError),
    "NaN score": (lambda m, t, s: mask({**s, "lm_head.weight": torch.full((2, 3), _NAN)}, 0.5), NonFiniteError),
    "density mask of wrong shape": (lambda m, t, s: density({"lm_head.weight": torch.ones(3, dtype=torch.bool)}, m),
                                    PatchlabValueError),
    "overlap shape mismatch": (lambda m, t, s: overlap({"a": torch.ones(2, dtype=torch.bool)},
                                                       {"a": torch.ones(3, dtype=torch.bool)}), PatchlabValueError),
}


@pytest.mark.parametrize("call, error", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_inputs_raise(models, tokenizer, signed_scores, call, error):
    model = models["llama"]
    with pytest.raises(error):
        call(model, tokenizer, signed_scores)
    # a failed call leaves the (eval-mode, fully trainable) model as it was
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------ WAGLE as its authors run it


def _snip_advanced(model: nn.Module, forget_batches, retain_batches, mu: float) -> torch.Tensor:
    """A direct transcription of ``GenerateMask.snip_advanced`` (OPTML-Group/WAGLE, src/unlearn/generate_mask.py):
    eval mode, each batch's ``outputs.loss`` back-propagated, ``.grad`` summed over batches, then
    ``-|(θ - G_r/mu) ⊙ G_f|`` flattened over ``named_parameters()`` (their ``self.scores``)."""
    forget_gradint, retain_gradint = {}, {}
    model.eval()
    model.zero_grad()
    for name, loader, store in (("forget", forget_batches, forget_gradint), ("retain", retain_batches, retain_gradint)):
        for inputs in loader:
            loss = model(**inputs).loss
            loss.backward()
            with torch.no_grad():
                for key, tensor in model.named_parameters():
                    if key not in store:
                        store[key] = tensor.grad.data
                    else:
                        store[key] += tensor.grad.data
            model.zero_grad()
    with torch.no_grad():
        out = {key: -torch.abs((tensor.data - retain_gradint[key] / mu) * forget_gradint[key])
               for key, tensor in model.named_parameters()}
        return torch.cat([s.flatten().cpu() for s in out.values()])


def _their_mask(model: nn.Module, scores_flat: torch.Tensor, ratio: float, stable: bool = False
                ) -> dict[str, torch.Tensor]:
    """The mask loop of ``GenerateMask.get_mask`` (ranks of ``argsort(scores)``, ``rank < int(len · ratio)``);
    ``stable=True`` orders exact ties by position (their ``argsort`` leaves it to the implementation)."""
    positions = torch.argsort(scores_flat, stable=stable)
    ranks = torch.argsort(positions)
    threshold_idx = int(len(scores_flat) * ratio)
    hard_dict, start_index = {}, 0
    for key, tensor in model.named_parameters():
        tensor_ranks = ranks[start_index:start_index + tensor.numel()]
        threshold_tensor = torch.zeros_like(tensor_ranks)
        threshold_tensor[tensor_ranks < threshold_idx] = 1
        hard_dict[key] = threshold_tensor.reshape(tensor.shape).type(torch.bool)
        start_index += tensor.numel()
    return hard_dict


@pytest.mark.parametrize("family", ["llama_tied", "gpt2"])
def test_authors_preset_reproduces_their_ranking(tokenizer, encoded, family):
    # dropout on, so a gradient taken in train mode would differ: the preset must run in eval mode like theirs
    extra = {"attention_dropout": 0.3} if family.startswith("llama") else {"resid_pdrop": 0.3, "attn_pdrop": 0.3}
    model = tiny_model(family.split("_")[0], len(tokenizer), n_layers=2, tie_embeddings=family == "llama_tied",
                       **extra).train()
    pad = tokenizer.pad_token_id
    one_by_one = {k: [collate([e], pad) for e in v] for k, v in encoded.items()}
    theirs = _snip_advanced(copy.deepcopy(model), one_by_one["forget"], one_by_one["retain"], mu=1e-6)
    ours = scores(model, encoded["forget"], encoded["retain"], method="wagle", preset="authors", progress=False)
    assert model.training  # the caller's mode is restored
    assert list(ours) == [n for n, _ in model.named_parameters()]  # every parameter: embeddings, norms, head
    flat = torch.cat([s.flatten() for s in ours.values()])
    torch.testing.assert_close(-flat.abs(), theirs, rtol=1e-6, atol=0)
    for ratio in (0.1, 0.5, 0.95):  # at 0.95 the GPT-2 cut falls among exact zeros (unused position rows)
        got = mask(ours, ratio, preset="authors")
        assert sum(int(m.sum()) for m in got.values()) == int(len(flat) * ratio)
        stable = _their_mask(model, theirs, ratio, stable=True)
        assert all(torch.equal(got[n], stable[n]) for n in stable), ratio
        cut = torch.sort(theirs).values[int(len(flat) * ratio) - 1]
        untied = theirs != cut  # off the tie at the cut, their own (unstable) argsort agrees too
        want = torch.cat([m.flatten() for m in _their_mask(model, theirs, ratio).values()])
        assert torch.equal(torch.cat([m.flatten() for m in got.values()])[untied], want[untied]), ratio


def test_authors_mu_is_the_mean_gradient_gamma_divided_by_the_retain_count(models, encoded):
    # S_sum(mu) = N_f · S_mean(gamma = mu / N_r): summed gradients at mu rank like mean gradients at mu / N_r
    model, mu = models["llama"], 1e-3
    n_f, n_r = len(encoded["forget"]), len(encoded["retain"])
    authors = scores(model, encoded["forget"], encoded["retain"], preset="authors", gamma=mu, progress=False)
    mean = scores(model, encoded["forget"], encoded["retain"], gamma=mu / n_r, forget_loss="nll", batch_size=1,
                  progress=False)
    for name in authors:
        torch.testing.assert_close(authors[name], n_f * mean[name], rtol=1e-4,
                                   atol=1e-6 * float(authors[name].abs().max()))
    assert all(torch.equal(a, b) for a, b in zip(mask(authors, 0.5).values(), mask(mean, 0.5).values()))


def test_authors_preset_refuses_what_it_fixes(models, encoded):
    model, f, r = models["llama"], encoded["forget"], encoded["retain"]
    cases = [(dict(batch_size=4), "fixes batch_size to 1"), (dict(forget_loss="ascent"), "fixes forget_loss"),
             (dict(loss=nll), "plain NLL")]
    for kwargs, match in cases:
        with pytest.raises(PatchlabValueError, match=match):
            scores(model, f, r, preset="authors", progress=False, **kwargs)
    with pytest.raises(PatchlabValueError, match="unknown attribution preset 'paper'"):
        scores(model, f, r, preset="paper", progress=False)
    s = scores(model, method="magnitude")
    for kwargs in (dict(per_layer=True), dict(by="value")):
        with pytest.raises(PatchlabValueError, match="ranks globally by"):
            mask(s, 0.5, preset="authors", **kwargs)


def test_masking_after_clipping_is_their_mask_gradient(models, encoded, tokenizer):
    """apply_mask(after_clipping=True) + mask_before_step: clip the full gradient, then multiply by the mask
    (their BaseTrainer: clip_grad_norm_, mask_gradient, optimizer.step), unlike masking during backward."""
    base = models["gpt2"]
    m = mask(scores(base, method="random", seed=3), 0.3)
    batch = collate(encoded["forget"], tokenizer.pad_token_id)

    def one_step(after_clipping: bool, transcribed: bool = False) -> nn.Module:
        model = copy.deepcopy(base).train()
        params, hooks = apply_mask(model, None if transcribed else m, after_clipping=after_clipping)
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        if after_clipping and not transcribed:
            hooks.append(mask_before_step(optimizer, model, m))
        nll(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # far below the gradient norm: it clips
        if transcribed:
            for key, tensor in model.named_parameters():
                tensor.grad *= m[key]
        optimizer.step()
        for h in hooks:
            h.remove()
        return model

    ours, theirs, during_backward = one_step(True), one_step(True, transcribed=True), one_step(False)
    for (name, p), q, r in zip(ours.named_parameters(), theirs.parameters(), during_backward.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert torch.equal(p.detach()[~m[name]], base.get_parameter(name).detach()[~m[name]])  # unselected: unchanged
    moved = lambda model: sum(float((p - q).detach().abs().sum()) for p, q in zip(model.parameters(), base.parameters()))
    assert moved(ours) != pytest.approx(moved(during_backward), rel=1e-3)  # the clipping norm differs
