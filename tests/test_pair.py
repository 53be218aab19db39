"""Loading and validating vanilla / unlearned pairs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import patchlab
from patchlab.pair import hub, loading
from patchlab.pair.adapters import AdapterBaseWarning
from patchlab.pair.arch import _REGISTRY, supported_architectures
from patchlab.pair.loading import is_hub_id
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


def _any_family(model_type: str) -> torch.nn.Module:
    """A 2-layer random model of any registered ``model_type`` (sizes in each config's own key names)."""
    sizes = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64) if model_type == "gpt2" else dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=64)
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", supported_architectures())
def test_every_parameter_of_every_family_has_a_module_type(model_type):
    model = _any_family(model_type)
    spec = patchlab.arch_spec(model)
    kinds = {name: spec.module_type(name) for name, _ in model.named_parameters()}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    assert {"embedding", "attn_o", "mlp_down"} <= set(kinds.values())
    for name, kind in kinds.items():
        layer = spec.split_name(name)[0]
        assert (layer is None) == (not name.startswith(spec.layers + ".")), name
        if layer is not None:
            assert spec.layer_modules(model)[layer] in [m for n, m in model.named_modules() if name.startswith(n + ".")]


def test_module_types_read_checkpoint_spellings():
    gpt2, llama = _REGISTRY["gpt2"], _REGISTRY["llama"]
    # GPT-2's original files drop the "transformer." prefix; PEFT wraps every name
    assert gpt2.split_name("h.3.attn.c_attn.weight") == (3, "attn.c_attn")
    assert [gpt2.module_type(n) for n in ("h.3.attn.c_attn.weight", "h.3.mlp.c_proj.bias", "wte.weight")] == \
        ["attn_qkv", "mlp_down", "embedding"]
    assert llama.module_type("base_model.model.model.layers.1.self_attn.q_proj.weight") == "attn_q"
    assert llama.module_type("base_model.model.lm_head.weight") == "lm_head"
    assert llama.module_type("model.layers.1.mlp.experts.0.w1.weight") == "other"
    assert patchlab.ArchSpec(layers="blocks", attn_out="attn.out", mlp_down="ffn.w2").module_type(
        "blocks.0.ffn.w2.weight") == "mlp_down"
    with pytest.raises(patchlab.PatchlabValueError, match="unknown module types.*'mlp_downn'"):
        patchlab.ArchSpec(layers="blocks", attn_out="attn.out", mlp_down="ffn.w2", module_types={"ffn.w1": "mlp_downn"})


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


# ------------------------------------------------------------------------------------------ PEFT adapters


@pytest.fixture(scope="module")
def adapter_run(vanilla_models, tok, tmp_path_factory):
    """A LLaMA vanilla checkpoint, a LoRA adapter trained on it (random non-zero B, so it changes the model) and
    the same adapter merged into a full checkpoint."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapter")
    vanilla_models["llama"].save_pretrained(root / "vanilla")  # the LoRA goes on a copy loaded from there
    tok.save_pretrained(root / "vanilla")
    base = patchlab.load_model(root / "vanilla")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                             init_lora_weights=False)
    lora = peft.get_peft_model(base, config)
    lora.save_pretrained(root / "adapter")
    lora.merge_and_unload().save_pretrained(root / "merged")
    return root


KRS_KW = dict(components=["coef", "value", "attn", "coef+attn"], window=3, n_tokens=4, progress=False)


def test_adapter_pair_equals_the_merged_checkpoint(adapter_run, tok):
    root = adapter_run
    adapter = patchlab.load_pair(root / "vanilla", root / "adapter")
    merged = patchlab.load_pair(root / "vanilla", root / "merged")
    # merged: the unlearned side is an ordinary model, no LoRA layer left for a site to trip over
    assert type(adapter.unlearned_hf.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert not any("lora" in name for name, _ in adapter.unlearned_hf.named_parameters())
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    logits_a, logits_m = adapter.unlearned_hf(ids).logits, merged.unlearned_hf(ids).logits
    torch.testing.assert_close(logits_a, logits_m, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_a, adapter.vanilla_hf(ids).logits, atol=1e-3)  # the adapter does change it
    a, b = patchlab.krs_sweep(adapter, QUESTIONS, **KRS_KW), patchlab.krs_sweep(merged, QUESTIONS, **KRS_KW)
    for comp in a.krs:
        np.testing.assert_allclose(a.krs[comp], b.krs[comp], atol=1e-5)


def test_adapter_base_is_the_vanilla_or_adapter_base(adapter_run, tok, tmp_path, monkeypatch):
    root = adapter_run
    reference = patchlab.load_model(root / "merged")
    ids = torch.tensor([tok(CORPUS[1]).input_ids])
    # an adapter whose config names a base that no longer exists (trained elsewhere): adapter_base= says where it is
    moved = tmp_path / "moved"
    (moved).mkdir()
    for f in (root / "adapter").iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/nonexistent/training/machine/vanilla"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(patchlab.PatchlabFileError, match="does not exist"):
        patchlab.load_pair(root / "vanilla", moved)
    vanilla = patchlab.load_model(root / "vanilla")
    before = {n: p.clone() for n, p in vanilla.named_parameters()}
    for base in (root / "vanilla", vanilla):
        with pytest.warns(AdapterBaseWarning, match="trained on '/nonexistent/training/machine/vanilla'"):
            pair = patchlab.load_pair(vanilla, moved, tokenizer=tok, adapter_base=base)
        torch.testing.assert_close(pair.unlearned_hf(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    # the in-memory vanilla model named as the base is copied, never merged into
    assert all(torch.equal(p, before[n]) for n, p in vanilla.named_parameters())
    # the in-memory vanilla loaded from the adapter's base path is recognised as its base without adapter_base=
    pair = patchlab.load_pair(vanilla, root / "adapter", tokenizer=tok)
    torch.testing.assert_close(pair.unlearned_hf(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    cfg["base_model_name_or_path"] = None
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(patchlab.PatchlabValueError, match="adapter_base"):
        patchlab.load_model(moved)
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(patchlab.MissingDependencyError, match=r"patchlab\[peft\]"):
        patchlab.load_pair(root / "vanilla", root / "adapter")


def test_adapter_that_does_not_fit_its_base_is_rejected(adapter_run, tok):
    other = tiny_model("llama", len(tok), n_layers=4, d_model=48, n_heads=4, tie_embeddings=True)
    with pytest.raises(patchlab.PatchlabValueError, match="could not apply the adapter"), \
            pytest.warns(AdapterBaseWarning, match="merged onto adapter_base='in-memory LlamaForCausalLM"):
        patchlab.load_model(adapter_run / "adapter", adapter_base=other)


# ------------------------------------------------------------------------------- hub ids and local paths


@pytest.mark.parametrize("spec, hub", [
    ("gpt2", True), ("open-unlearning/tofu_Llama-3.2-1B-Instruct_full", True), ("org/name", True),
    ("runs/graddif_typo", False),          # ./runs exists (see below): a local path
    ("./gpt2", False), ("../org/name", False), ("/abs/org", False), ("~/org/name", False),
    ("runs/a/b", False), ("org--x/name", False), ("org/na me", False), (r"org\name", False),
])
def test_hub_ids_and_local_paths_are_told_apart(spec, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_hub_id(spec) is hub
    assert not is_hub_id(Path("gpt2"))  # a path object is always a path


@pytest.fixture
def no_hub(monkeypatch):
    """The hub endpoint points at a closed local port (connection refused at once): a machine without network."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub._endpoint_reachable.cache_clear()
    yield
    hub._endpoint_reachable.cache_clear()


def test_mistyped_relative_path_fails_at_once_without_the_hub(saved_pair, tmp_path, monkeypatch):
    v_dir = saved_pair[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(loading, "hub_reachable", lambda *a: pytest.fail("a local path must not reach the hub"))
    start = time.perf_counter()
    with pytest.raises(patchlab.PatchlabFileError, match="'runs/graddif_typo' does not exist"):
        patchlab.load_pair(v_dir, "runs/graddif_typo")
    assert time.perf_counter() - start < 1.0


def test_unreachable_hub_fails_fast_with_a_clear_error(saved_pair, tmp_path, monkeypatch, no_hub):
    v_dir = saved_pair[0]
    monkeypatch.chdir(tmp_path)  # no ./org here: org/name has the shape of a hub id
    start = time.perf_counter()
    with pytest.raises(patchlab.PatchlabFileError, match="did not answer within"):
        patchlab.load_pair(v_dir, "someorg/somemodel")
    assert time.perf_counter() - start < loading.HUB_TIMEOUT_S + 1.0
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(patchlab.PatchlabFileError, match="offline mode"):
        patchlab.load_model("someorg/somemodel")


def test_cached_hub_id_loads_without_network(saved_pair, tok, tmp_path, monkeypatch, no_hub):
    """A hub id already in the local hub cache loads from it when the hub does not answer."""
    from huggingface_hub import constants
    v_dir, u_dir, vanilla, _ = saved_pair
    repo = tmp_path / "hub" / "models--someorg--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in u_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    pair = patchlab.load_pair(v_dir, "someorg/cached")
    assert time.perf_counter() - start < loading.HUB_TIMEOUT_S + 2.0  # no request retried in the background
    assert not constants.HF_HUB_OFFLINE  # offline only while loading
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    torch.testing.assert_close(pair.unlearned_hf(ids).logits, patchlab.load_model(u_dir)(ids).logits)


def test_adapter_on_another_base_has_another_digest_and_resume_key(adapter_run, tok, tmp_path):
    root = adapter_run
    other = perturbed(patchlab.load_model(root / "vanilla"), ATTN_OR_UP)
    other.save_pretrained(tmp_path / "other")
    own = patchlab.load_pair(root / "vanilla", root / "adapter")
    with pytest.warns(AdapterBaseWarning, match="was trained on .*vanilla.* but is merged onto adapter_base=.*other"):
        moved = patchlab.load_pair(root / "vanilla", root / "adapter", adapter_base=tmp_path / "other")
    kw = dict(KRS_KW, components=["coef"])
    a = patchlab.krs_sweep(own, QUESTIONS, resume=tmp_path / "out", **kw)
    assert a.provenance["unlearned"]["adapter_base"] == str((root / "vanilla").resolve())
    with pytest.raises(patchlab.PatchlabFileError, match="other settings, questions or checkpoints"):
        patchlab.krs_sweep(moved, QUESTIONS, resume=tmp_path / "out", **kw)  # not the other base's stored numbers
    b = patchlab.krs_sweep(moved, QUESTIONS, resume=tmp_path / "out-other", **kw)
    assert b.provenance["unlearned"]["weights"] != a.provenance["unlearned"]["weights"]
    assert b.provenance["unlearned"]["source"] == a.provenance["unlearned"]["source"]
    assert not np.allclose(a.per_question["coef"], b.per_question["coef"])
    sequential = patchlab.load_pair(root / "vanilla", root / "adapter", sequential=True)
    assert patchlab.provenance.pair_provenance(sequential)["unlearned"] == a.provenance["unlearned"]


def test_missing_adapter_base_names_where_it_came_from(adapter_run, tmp_path, monkeypatch):
    from huggingface_hub import constants
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (adapter_run / "adapter").iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for base, why in (("/nonexistent/training/machine/vanilla", "does not exist"), ("someorg/base", "offline mode")):
        (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        for sequential in (False, True):
            with pytest.raises(patchlab.PatchlabFileError, match=f"names its base model '{base}' "
                               r"\(base_model_name_or_path in .*adapter_config.json\), which cannot be loaded: .*"
                               f"{why}.*" r"adapter_base=\.\.\. \(--adapter-base\)"):
                patchlab.load_pair(adapter_run / "vanilla", moved, sequential=sequential)


def test_hub_adapter_is_detected_and_merged_like_a_local_one(adapter_run, tok, monkeypatch):
    """A hub id whose repository holds adapter_config.json is an adapter (files fetched with hf_hub_download,
    here served from a local directory); adapter_base= applies to it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from patchlab.pair import adapters
    root = adapter_run
    fetched = []

    def fake_download(repo_id, filename, local_files_only=False):
        fetched.append((repo_id, filename, local_files_only))
        path = root / "adapter" / filename
        if repo_id != "someorg/lora" or not path.exists():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename}")
        return str(path)

    monkeypatch.setattr(adapters, "hf_hub_download", fake_download)
    for module in (loading, adapters):  # offline: from the local hub cache only
        monkeypatch.setattr(module, "hub_reachable", lambda *a: False)
    assert adapters.local_adapter("someorg/lora") == root / "adapter"
    assert adapters.local_adapter("someorg/full-model") is None
    assert all(offline for *_, offline in fetched)
    pair = patchlab.load_pair(root / "vanilla", "someorg/lora", adapter_base=root / "vanilla")
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    torch.testing.assert_close(pair.unlearned_hf(ids).logits, patchlab.load_model(root / "merged")(ids).logits,
                               atol=1e-5, rtol=0)
    assert pair.sources[1] == "someorg/lora"
    local = patchlab.load_pair(root / "vanilla", root / "adapter")
    assert patchlab.provenance.pair_provenance(pair)["unlearned"]["weights"] == \
        patchlab.provenance.pair_provenance(local)["unlearned"]["weights"]


# ------------------------------------------------------------------------------------------- dtypes


@pytest.fixture(scope="module")
def llama_dirs(tok, tmp_path_factory):
    """A tiny float32 LLaMA pair saved to ``vanilla/`` and ``unlearned/``, and the unlearned one in bfloat16."""
    root = tmp_path_factory.mktemp("llama_dtype")
    torch.manual_seed(0)
    vanilla = tiny_model("llama", len(tok), n_layers=2)
    unlearned = perturbed(vanilla, ATTN_OR_UP)
    vanilla.save_pretrained(root / "vanilla")
    tok.save_pretrained(root / "vanilla")
    unlearned.save_pretrained(root / "unlearned")
    unlearned.to(torch.bfloat16).save_pretrained(root / "unlearned-bf16")
    return root


#: 120 positions: far enough along for a bfloat16 RoPE inv_freq to move the logits.
LONG_IDS = (torch.arange(120) % 20 + 4)[None]


def test_bf16_pairs_compute_what_from_pretrained_bf16_computes(llama_dirs, tok):
    from transformers import AutoModelForCausalLM

    from patchlab import cli, cli_pairs
    root = llama_dirs
    reference = {side: AutoModelForCausalLM.from_pretrained(root / side, dtype=torch.bfloat16)(LONG_IDS).logits
                 for side in ("vanilla", "unlearned")}
    cast_all = AutoModelForCausalLM.from_pretrained(root / "vanilla").to(torch.bfloat16)(LONG_IDS).logits
    assert not torch.equal(cast_all, reference["vanilla"])  # model.to(bf16) rounds inv_freq: other numbers
    parser = cli_pairs.add_pair_args(cli.add_model_args(cli.argparse.ArgumentParser()))
    flags = cli_pairs.pair_kwargs(parser.parse_args(["--dtype", "bfloat16"]))
    pairs = {"whole": patchlab.load_pair(root / "vanilla", root / "unlearned", dtype=torch.bfloat16),
             "--dtype": patchlab.load_pair(root / "vanilla", root / "unlearned", **flags),
             "in memory": patchlab.load_pair(*(patchlab.load_model(root / side) for side in ("vanilla", "unlearned")),
                                             tokenizer=tok, dtype=torch.bfloat16),
             "sequential": patchlab.load_pair(root / "vanilla", root / "unlearned", dtype=torch.bfloat16,
                                              sequential=True)}
    for mode, pair in pairs.items():
        for side in ("vanilla", "unlearned"):
            with pair.using(side) as model:
                assert model.model.rotary_emb.inv_freq.dtype == torch.float32, (mode, side)
                assert torch.equal(model(LONG_IDS).logits, reference[side]), (mode, side)
            del model


def test_cast_model_keeps_the_buffers_transformers_keeps(tok, tmp_path):
    from transformers import AutoModelForCausalLM
    for family in ("gemma", "gpt_neox"):  # Gemma's embed_scale follows the dtype, inv_freq stays float32
        tiny_model(family, len(tok), n_layers=2).save_pretrained(tmp_path / family)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.bfloat16)
        cast = loading.cast_model(AutoModelForCausalLM.from_pretrained(tmp_path / family), torch.bfloat16)
        dtypes = {n: t.dtype for n, t in (*cast.named_parameters(), *cast.named_buffers())}
        assert dtypes == {n: t.dtype for n, t in (*reference.named_parameters(), *reference.named_buffers())}
        assert torch.equal(cast(LONG_IDS).logits, reference(LONG_IDS).logits), family


def test_bf16_adapter_is_merged_onto_the_bf16_base(adapter_run, tok):
    from transformers import AutoModelForCausalLM

    from patchlab.pair.adapters import merge_adapter
    root = adapter_run
    expected = merge_adapter(AutoModelForCausalLM.from_pretrained(root / "vanilla", dtype=torch.bfloat16),
                             root / "adapter")(LONG_IDS).logits
    for sequential in (False, True):
        pair = patchlab.load_pair(root / "vanilla", root / "adapter", dtype=torch.bfloat16, sequential=sequential)
        with pair.using("unlearned") as model:
            assert model.model.rotary_emb.inv_freq.dtype == torch.float32
            assert torch.equal(model(LONG_IDS).logits, expected), sequential
        del model
    in_memory = patchlab.load_pair(patchlab.load_model(root / "vanilla"), root / "adapter", tokenizer=tok,
                                   dtype=torch.bfloat16)
    assert torch.equal(in_memory.unlearned_hf(LONG_IDS).logits, expected)


def test_pairs_of_two_dtypes_are_refused(llama_dirs):
    root = llama_dirs
    for sequential in (False, True):
        with pytest.raises(patchlab.PairMismatchError,
                           match="vanilla weights are float32 but unlearned weights are bfloat16: pass dtype="):
            patchlab.load_pair(root / "vanilla", root / "unlearned-bf16", sequential=sequential)
    pair = patchlab.load_pair(root / "vanilla", root / "unlearned-bf16", dtype=torch.float32)
    assert pair.unlearned_hf.dtype == pair.vanilla_hf.dtype == torch.float32


# ----------------------------------------------------------------------------- broken checkpoint files


def test_truncated_safetensors_and_unknown_model_type_give_patchlab_errors(llama_dirs, tmp_path):
    root = llama_dirs
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in (root / "unlearned").iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    for sequential in (False, True):
        for args in ((root / "vanilla", truncated), (truncated, root / "unlearned")):
            with pytest.raises(patchlab.PatchlabFileError, match="truncated/model.safetensors is truncated or corrupt"):
                patchlab.load_pair(*args, tokenizer=root / "vanilla", sequential=sequential)
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in (root / "unlearned").iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "mystery_lm"}))
    for sequential in (False, True):
        with pytest.raises(patchlab.PatchlabFileError, match="could not load .*custom.*model type `mystery_lm`"):
            patchlab.load_pair(root / "vanilla", custom, sequential=sequential)


def test_truncated_adapter_weights_are_named(adapter_run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (adapter_run / "adapter").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:100] if f.suffix == ".safetensors" else data)
    for sequential in (False, True):
        with pytest.raises(patchlab.PatchlabFileError, match=r"could not load the adapter .*broken/"
                                                             r"adapter_model.safetensors is truncated or corrupt"):
            patchlab.load_pair(adapter_run / "vanilla", broken, sequential=sequential)
