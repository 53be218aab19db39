"""Loading and validating vanilla / unlearned pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab
from patchlab.pair.arch import _REGISTRY
from patchlab.tiny import tiny_model, word_tokenizer
from tests.conftest import ATTN_OR_UP, CORPUS, QUESTIONS, perturbed


@pytest.fixture(scope="module")
def saved_pair(vanilla_models, tok, tmp_path_factory):
    """A GPT-2 pair saved to two checkpoint directories, each with its tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    vanilla = vanilla_models["gpt2"]
    unlearned = perturbed(vanilla, ATTN_OR_UP)
    for name, model in (("vanilla", vanilla), ("unlearned", unlearned)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "vanilla", root / "unlearned", vanilla, unlearned


def test_directories_and_in_memory_models_give_the_same_sweep(saved_pair, tok):
    v_dir, u_dir, vanilla, unlearned = saved_pair
    from_disk = patchlab.load_pair(str(v_dir), u_dir)
    in_memory = patchlab.load_pair(vanilla, unlearned, tokenizer=tok)
    assert from_disk.n_layers == 4 and from_disk.arch.conv1d
    assert from_disk.tokenizer.get_vocab() == tok.get_vocab()
    kw = dict(components=["coef", "attn"], window=3, n_tokens=4, progress=False)
    a = patchlab.krs_sweep(from_disk, QUESTIONS, **kw)
    b = patchlab.krs_sweep(in_memory, QUESTIONS, **kw)
    for comp in a.krs:
        np.testing.assert_allclose(a.krs[comp], b.krs[comp], atol=1e-6)


def test_traced_models_expose_ordinary_module_paths(saved_pair, tok):
    _, _, vanilla, unlearned = saved_pair
    pair = patchlab.load_pair(vanilla, unlearned, tokenizer=tok)
    cache = patchlab.run_with_cache(pair, torch.tensor([tok(CORPUS[0]).input_ids]))
    assert cache.coef(0).shape[-1] == vanilla.config.n_inner
    assert cache.attn(3).shape[-1] == vanilla.config.n_embd
    torch.testing.assert_close(cache["logits"], vanilla(torch.tensor([tok(CORPUS[0]).input_ids])).logits)


def test_bad_paths_and_specs(saved_pair, tmp_path, tok):
    v_dir, u_dir, vanilla, _ = saved_pair
    with pytest.raises(patchlab.PatchlabFileError, match="does not exist"):
        patchlab.load_pair(v_dir, tmp_path / "nowhere")
    with pytest.raises(patchlab.PatchlabFileError, match="is a file"):
        patchlab.load_pair(v_dir, v_dir / "config.json")
    with pytest.raises(patchlab.PatchlabFileError, match="could not load model"):
        patchlab.load_pair(v_dir, tmp_path)  # an existing directory without a checkpoint
    with pytest.raises(patchlab.PatchlabValueError, match="PreTrainedModel"):
        patchlab.load_pair(v_dir, 42)
    with pytest.raises(patchlab.PatchlabValueError, match="tokenizer"):
        patchlab.load_pair(vanilla, u_dir)  # in-memory vanilla carries no tokenizer
    with pytest.raises(patchlab.PairMismatchError, match="same model object"):
        patchlab.load_pair(vanilla, vanilla, tokenizer=tok)


@pytest.mark.parametrize("change, match", [
    (dict(family="llama"), "architecture"),
    (dict(n_layers=3), "layer count"),
    (dict(d_model=48), "hidden size"),
    (dict(d_mlp=96), "intermediate size"),
    (dict(vocab_extra=5), "vocab size"),
])
def test_incompatible_pairs_are_rejected(vanilla_models, tok, change, match):
    kw = dict(n_layers=4, n_heads=4)
    kw.update({k: v for k, v in change.items() if k not in ("family", "vocab_extra")})
    other = tiny_model(change.get("family", "gpt2"), len(tok) + change.get("vocab_extra", 0), **kw)
    with pytest.raises(patchlab.PairMismatchError, match=match):
        patchlab.load_pair(vanilla_models["gpt2"], other, tokenizer=tok)


def test_tokenizer_mismatch_is_rejected(saved_pair, tmp_path, tok):
    v_dir, _, _, unlearned = saved_pair
    unlearned.save_pretrained(tmp_path / "u")
    word_tokenizer(CORPUS + ["zebra quokka"]).save_pretrained(tmp_path / "u")
    with pytest.raises(patchlab.PairMismatchError, match="tokenizers"):
        patchlab.load_pair(v_dir, tmp_path / "u")
    small = tiny_model("gpt2", 10, n_layers=4)
    with pytest.raises(patchlab.PairMismatchError, match="tokenizer has"):
        patchlab.load_pair(small, perturbed(small, ATTN_OR_UP), tokenizer=tok)


def test_registry_names_the_sites_of_every_family(tok):
    for family in ("llama", "mistral", "qwen2", "gemma", "olmo", "olmo2", "gpt2", "gpt_neox"):
        model = tiny_model(family, len(tok), n_layers=2)
        spec = patchlab.arch_spec(model)
        layer = spec.layer_modules(model)[1]
        down = layer.get_submodule(spec.mlp_down)
        d_model = model.config.hidden_size
        assert spec.value_weight(model, 1).shape[0] == d_model, family
        assert spec.value_weight(model, 1).shape[1] == spec.down_proj(model, 1).weight.numel() // d_model
        assert down is spec.down_proj(model, 1)
        assert spec.site_names == ("coef", "value", "attn", "heads", "mlp_out", "resid"), family
        assert spec.site_module(model, "resid", 1) is layer and spec.site_module(model, "coef", 1) is down
        assert spec.norm(model) is not None and spec.norm(model) in list(model.modules())


def test_unknown_architecture_error_explains_registration(vanilla_models):
    model = vanilla_models["gpt2"]
    model.config.model_type = "mystery_lm"
    try:
        with pytest.raises(patchlab.UnsupportedArchitectureError, match="register_architecture"):
            patchlab.arch_spec(model)
        patchlab.register_architecture("mystery_lm", _REGISTRY["gpt2"])
        assert patchlab.arch_spec(model).conv1d
        with pytest.raises(patchlab.UnsupportedArchitectureError, match="already registered"):
            patchlab.register_architecture("mystery_lm", patchlab.ArchSpec("a", "b", "c"))
    finally:
        model.config.model_type = "gpt2"
        _REGISTRY.pop("mystery_lm", None)
