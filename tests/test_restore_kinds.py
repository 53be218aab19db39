"""Restore kinds as registered entries: a kind defined here, in one entry, works in the batched engine, the nnsight
loop, the TransformerLens adapter and the command line, with no other edit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import patchlab
from patchlab.pair.sites import Site
from patchlab.patching import lens
from patchlab.patching.loop import restore
from patchlab.patching.restore import (Restoration, RestoreKind, register_restore_kind, restore_kind,
                                       unregister_restore_kind)
from tests.conftest import ATTN_OR_UP, CORPUS, EVERYTHING, QUESTIONS, load_script, perturbed


def scaled(alpha: float) -> RestoreKind:
    """``vanilla * alpha + unlearned * (1 - alpha)`` at the site's read point: the whole kind."""
    def apply(r: Restoration) -> torch.Tensor:
        return alpha * r.source.to(r.current.dtype) + (1 - alpha) * r.current
    return RestoreKind("scaled", ("input", "output"), apply)


@pytest.fixture
def scaled_site():
    """Registers the kind with alpha (the fixture's returned function) and a site using it on the MLP down
    projection's input (like ``coef``); both removed after the test."""
    def use(alpha: float) -> None:
        register_restore_kind(scaled(alpha), overwrite=True)
        patchlab.register_site(Site("scaled_coef", "mlp.down_proj", "input", "scaled"), "llama", overwrite=True)
    yield use
    patchlab.unregister_site("scaled_coef", "llama")
    unregister_restore_kind("scaled")


def test_a_registered_kind_gives_the_same_numbers_in_every_engine(vanilla_models, tok, scaled_site):
    scaled_site(0.5)
    vanilla = vanilla_models["llama"]
    pair = patchlab.load_pair(vanilla, perturbed(vanilla, EVERYTHING), tokenizer=tok)
    kw = dict(questions=QUESTIONS, n_tokens=5, progress=False, components=["scaled_coef", "scaled_coef+attn", "coef"],
              window=2)
    fast, loop = patchlab.patch_sweep(pair, batch_size=5, **kw), patchlab.patch_sweep(pair, engine="loop", **kw)
    for comp in fast.components:
        np.testing.assert_allclose(fast.per_question[comp], loop.per_question[comp], atol=1e-5)
    # half way: it restores something, and not what overwriting does
    assert np.abs(fast.scores["scaled_coef"]).max() > 1e-3
    assert np.abs(fast.scores["scaled_coef"] - fast.scores["coef"]).max() > 1e-3
    ids = torch.tensor(tok(CORPUS[0]).input_ids)
    mask = torch.tensor([i % 2 == 0 for i in range(len(ids))])
    bridge_v, bridge_u = lens.bridge_pair(pair)
    with torch.no_grad():
        _, tl_cache = bridge_v.run_with_cache(ids[None])
        got = bridge_u.run_with_hooks(ids[None], fwd_hooks=lens.restore_hooks(
            tl_cache, "scaled_coef+value", (1, 3), mask, vanilla_model=pair.vanilla_hf, bridge=bridge_u))
    torch.testing.assert_close(got, restore(pair, ids, "scaled_coef+value", (1, 3), mask), atol=1e-4, rtol=0)


def test_alpha_one_is_overwrite_from_the_command_line(vanilla_models, tok, scaled_site, tmp_path):
    scaled_site(1.0)
    vanilla = vanilla_models["llama"]
    for name, model in (("vanilla", vanilla), ("unlearned", perturbed(vanilla, ATTN_OR_UP))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS))
    code = load_script("krs_sweep").main([
        "--vanilla", str(tmp_path / "vanilla"), "--unlearned", str(tmp_path / "unlearned"), "--questions",
        str(tmp_path / "questions.jsonl"), "--components", "coef,scaled_coef", "--window", "3", "--n-tokens", "4",
        "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    result = patchlab.KRSResult.load(tmp_path / "out" / "krs.json")
    assert np.abs(result.scores["coef"]).max() > 1e-3
    np.testing.assert_allclose(result.per_question["scaled_coef"], result.per_question["coef"], atol=1e-6)


def test_kind_registrations_are_checked(scaled_site):
    with pytest.raises(patchlab.PatchlabValueError, match="restore one of"):
        Site("s", "mlp.down_proj", "input", "scaled")
    with pytest.raises(patchlab.PatchlabValueError, match="already exists"):
        register_restore_kind(RestoreKind("overwrite", ("input",), lambda r: r.source))
    with pytest.raises(patchlab.PatchlabValueError, match="RestoreKind"):
        register_restore_kind(lambda r: r.source)
    with pytest.raises(patchlab.PatchlabValueError, match="subset of"):
        register_restore_kind(RestoreKind("bad", ("inputs",), lambda r: r.source))
    with pytest.raises(patchlab.PatchlabValueError, match="must recompute"):
        register_restore_kind(RestoreKind("bad", ("weight",), lambda r: r.source))
    with pytest.raises(patchlab.PatchlabValueError, match="built-in"):
        unregister_restore_kind("overwrite")
    with pytest.raises(patchlab.PatchlabValueError, match="unknown restore kind 'nope'"):
        restore_kind("nope")
    scaled_site(0.5)
    with pytest.raises(patchlab.PatchlabValueError, match="needs reads"):
        Site("s", "mlp.down_proj", "weight", "scaled")
    assert Site("s", "mlp.down_proj", "input", "scaled").point == "input"
