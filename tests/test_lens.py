"""TransformerLens adapter: bridges equal the HF models and leave them untouched, TL cache names mean what
patchlab's mean, TL restoration hooks give the same logits as patchlab's own restorations, input errors."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge  # a hard dependency of this test module
from transformers import AutoConfig, AutoModelForCausalLM

import patchlab
from patchlab.patching import lens
from patchlab.patching.loop import restore
from patchlab.tiny import tiny_model
from tests.conftest import ATTN_OR_UP, CORPUS, perturbed

SITES = "coef+value+attn"
FAMILIES = ["llama", "gpt2"]  # llama: grouped-query attention (4 heads, 2 KV heads), tied embeddings; gpt2: Conv1D
ATOL = 1e-4
WINDOW = (1, 3)  # of 4 layers

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def ids(tok):
    return torch.tensor(tok(CORPUS[0]).input_ids)


@pytest.fixture(scope="module")
def bridges(biased_pairs):
    return {fam: lens.bridge_pair(biased_pairs[fam]) for fam in FAMILIES}


@pytest.fixture(scope="module")
def caches(biased_pairs, bridges, ids):
    """family -> (TL vanilla cache, patchlab vanilla cache, unlearned logits)."""
    out = {}
    with torch.no_grad():
        for fam in FAMILIES:
            pair = biased_pairs[fam]
            _, tl_cache = bridges[fam][0].run_with_cache(ids[None])
            out[fam] = (tl_cache, patchlab.run_with_cache(pair, ids[None]),
                        patchlab.run_with_cache(pair, ids[None], which="unlearned")["logits"])
    return out


def _structure(model: torch.nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("share_weights", [False, True])
def test_bridge_equals_model_and_leaves_it_untouched(biased_pairs, caches, ids, tok, family, share_weights):
    pair = biased_pairs[family]
    model = pair.unlearned_hf  # already traced by the pair (caches fixture)
    unlearned_logits = caches[family][2]
    structure, attn_impl = _structure(model), model.config._attn_implementation
    state = {k: v.clone() for k, v in model.state_dict().items()}

    b = lens.bridge(model, tokenizer=tok, share_weights=share_weights)
    assert isinstance(b, TransformerBridge) and not b.training
    with torch.no_grad():
        close(b(ids[None]), unlearned_logits)
        close(b(torch.stack([ids, ids.flip(0)])), model(torch.stack([ids, ids.flip(0)])).logits)

    # the model patchlab traces is unchanged: modules, state-dict keys and values, attention implementation
    assert _structure(model) == structure and model.config._attn_implementation == attn_impl
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    close(patchlab.run_with_cache(pair, ids[None], which="unlearned")["logits"], unlearned_logits, atol=0)
    # weights shared only when asked
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    shared = {p.data_ptr() for p in b.original_model.parameters()} & model_ptrs
    assert shared == (model_ptrs if share_weights else set())
    # the attached tokenizer is a copy that encodes like the pair's, and the pair's is not modified
    assert b.tokenizer is not tok and "add_bos_token" not in tok.init_kwargs
    assert b.tokenizer.init_kwargs == tok.init_kwargs
    assert b.to_tokens(CORPUS[0], prepend_bos=False)[0].tolist() == ids.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_tl_cache_names_match_patchlab_cache(biased_pairs, bridges, ids, family):
    pair, L = biased_pairs[family], biased_pairs[family].n_layers
    for which, b in zip(("vanilla", "unlearned"), bridges[family]):
        with torch.no_grad():
            logits, tl = b.run_with_cache(ids[None])
        ours = patchlab.run_with_cache(pair, ids[None], which=which)
        close(logits, ours["logits"])
        for i in range(L):
            close(tl[f"blocks.{i}.mlp.hook_post"], ours.coef(i), atol=1e-5)
            close(tl[f"blocks.{i}.hook_attn_out"], ours.attn(i), atol=1e-5)  # pre-norm family: the same tensor
            close(tl[f"blocks.{i}.hook_resid_post"], ours.resid_post(i), atol=1e-5)
            paths = lens.tl_paths(b)
            for site in pair.arch.sites:  # every site's TransformerLens hook holds what patchlab caches
                if site.cached is not None:
                    tl_value = tl[lens.tl_hook_name(paths, site, i, site.cached)]
                    close(tl_value.flatten(2), ours.site(site.name, i), atol=1e-5)


def _mask(kind: str, seq: int) -> torch.Tensor:
    if kind == "all":
        return torch.ones(seq, dtype=torch.bool)
    return torch.tensor([i % 3 != 0 for i in range(seq)])  # scattered, the first position not restored


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "partial"])
@pytest.mark.parametrize("sites", ["coef", "attn", "coef+attn", "value", "coef+value+attn", "heads[1,2]", "mlp_out",
                                   "resid"])
def test_tl_hooks_equal_patchlab_restore(biased_pairs, bridges, caches, ids, family, positions, sites):
    pair, bridge_u = biased_pairs[family], bridges[family][1]
    tl_cache, our_cache, unlearned_logits = caches[family]
    mask = _mask(positions, len(ids))
    expected = restore(pair, ids, patchlab.parse_component(sites), WINDOW, mask)
    for cache in (tl_cache, our_cache):  # a TransformerLens cache or patchlab's, same restoration
        hooks = lens.restore_hooks(cache, sites, WINDOW, None if positions == "all" else mask,
                                   vanilla_model=pair.vanilla_hf, bridge=bridge_u)
        with torch.no_grad():
            got = bridge_u.run_with_hooks(ids[None], fwd_hooks=hooks)
        close(got, expected)
    assert (got - unlearned_logits).abs().max() > 1e-3  # the restoration changed something
    if positions == "partial":  # positions before the first restored one are untouched
        close(got[0, 0], unlearned_logits[0, 0], atol=1e-5)
    with torch.no_grad():  # run_with_hooks removed the hooks
        close(bridge_u(ids[None]), unlearned_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_restoration_gives_vanilla_logits(biased_pairs, bridges, caches, ids, family):
    pair, (_, bridge_u) = biased_pairs[family], bridges[family]
    tl_cache, our_cache, _ = caches[family]
    L = pair.n_layers
    with torch.no_grad():
        everything = bridge_u.run_with_hooks(
            ids[None], fwd_hooks=lens.restore_hooks(tl_cache, SITES, (0, L), vanilla_model=pair.vanilla_hf))
        no_value = bridge_u.run_with_hooks(ids[None], fwd_hooks=lens.restore_hooks(
            tl_cache, "coef+attn", (0, L), vanilla_model=pair.vanilla_hf))
        batch = bridge_u.run_with_hooks(torch.stack([ids, ids]),  # a batch-1 cache restores every row
                                        fwd_hooks=lens.restore_hooks(tl_cache, SITES, (0, L),
                                                                     vanilla_model=pair.vanilla_hf))
    close(everything, our_cache["logits"])
    close(batch, our_cache["logits"].expand(2, -1, -1))
    # the pair differs in the down projections: without value the last layer's MLP output still differs
    assert (no_value - our_cache["logits"]).abs().max() > 1e-3
    assert lens.restore_hooks(tl_cache, "coef+attn", (2, 2), vanilla_model=pair.vanilla_hf) == []


def test_bad_inputs(biased_pairs, bridges, caches, ids, tok, vanilla_models, monkeypatch):
    pair, bridge_u = biased_pairs["llama"], bridges["llama"][1]
    tl_cache, _, _ = caches["llama"]
    L = pair.n_layers
    with pytest.raises(patchlab.PatchlabValueError, match="PreTrainedModel"):
        lens.bridge(torch.nn.Linear(2, 2))
    with pytest.raises(patchlab.PatchlabValueError, match="tokenizer"):
        lens.bridge(pair.vanilla_hf, tokenizer="gpt2")
    with pytest.raises(patchlab.PatchlabValueError, match="ModelPair"):
        lens.bridge_pair(pair.vanilla_hf)
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", vocab_size=len(tok), hidden_size=16, word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(patchlab.UnsupportedArchitectureError, match="unsupported architecture 'opt'"):
        lens.bridge(opt)
    with monkeypatch.context() as m:  # a family patchlab knows but TransformerLens does not bridge
        m.setattr(lens, "_known_tl_architectures", dict)
        with pytest.raises(patchlab.UnsupportedArchitectureError, match="TransformerLens has no adapter"):
            lens.bridge(pair.vanilla_hf)

    cases = [
        (dict(sites="mlp"), "unknown component"),
        (dict(sites={"coef", "mlp"}), "unknown component"),
        (dict(sites=[]), "empty"),
        (dict(layers=(0, L + 1)), "layer window"),
        (dict(layers=(3, 1)), "layer window"),
        (dict(layers=(-1, 2)), "layer window"),
        (dict(layers=[0, 2]), "layer window"),
        (dict(positions=torch.ones(len(ids) + 1, dtype=torch.bool)), "positions"),
        (dict(positions=torch.ones(len(ids))), "positions"),
        (dict(vanilla_model=None), "vanilla_model"),
        (dict(sites="value", vanilla_model=vanilla_models["gpt_neox"]), "3 layers, the vanilla cache 4"),
        (dict(vanilla_cache=caches["llama"][1]), "bridge="),
        (dict(sites="heads", bridge=None), "bridge=bridge_u"),
        (dict(vanilla_cache={f"blocks.{i}.attn.o.hook_out": tl_cache[f"blocks.{i}.attn.o.hook_out"] for i in (0, 1)},
              bridge=bridge_u),
         "no 'blocks.0.mlp.out.hook_in'"),  # e.g. a cache run with a names_filter
        (dict(vanilla_cache=[1, 2]), "ActivationCache"),
        (dict(vanilla_cache={"logits": torch.zeros(1, 2, 3)}), "no per-layer"),
    ]
    for overrides, match in cases:
        kw = dict(vanilla_cache=tl_cache, sites="coef+attn", layers=(0, 2), vanilla_model=pair.vanilla_hf) | overrides
        with pytest.raises(patchlab.PatchlabValueError, match=match):
            lens.restore_hooks(**kw)
    # ids of another length than the cached ones are refused when the hooks run
    hooks = lens.restore_hooks(tl_cache, "coef", WINDOW, vanilla_model=pair.vanilla_hf)
    with pytest.raises(patchlab.PatchlabValueError, match="does not match the vanilla one"):
        with torch.no_grad():
            bridge_u.run_with_hooks(ids[None, :-1], fwd_hooks=hooks)
    # alike for a site read from the weights (no vanilla activation to compare with, only the positions)
    hooks = lens.restore_hooks(tl_cache, "value", WINDOW, vanilla_model=pair.vanilla_hf)
    with pytest.raises(patchlab.PatchlabValueError, match="does not match the vanilla one"):
        with torch.no_grad():
            bridge_u.run_with_hooks(ids[None, :-1], fwd_hooks=hooks)


def test_missing_transformer_lens_says_how_to_install(biased_pairs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge.sources", None)
    with pytest.raises(lens.MissingDependencyError, match=re.escape("pip install 'transformer-lens>=4.3,<5'")) as err:
        lens.bridge(biased_pairs["llama"].vanilla_hf)
    assert isinstance(err.value, patchlab.PatchlabError) and isinstance(err.value, ImportError)


def test_attn_site_is_the_output_projection_in_post_norm_families(tok, ids):
    """OLMo-2 normalizes the attention output before the residual add: TL's ``hook_attn_out`` is after that norm,
    the paper's attn site (patchlab's) before it; the hooks restore the latter."""
    vanilla = tiny_model("olmo2", len(tok), n_layers=3)
    unlearned = perturbed(vanilla, ATTN_OR_UP)
    with torch.no_grad():  # the norm between the two hook points differs too (initialized to 1, so unperturbed)
        for layer in unlearned.model.layers:
            layer.post_attention_layernorm.weight.mul_(1.5)
    pair = patchlab.load_pair(vanilla, unlearned, tokenizer=tok)
    bridge_v, bridge_u = lens.bridge_pair(pair)
    with torch.no_grad():
        _, tl_cache = bridge_v.run_with_cache(ids[None])
        ours = patchlab.run_with_cache(pair, ids[None])
        assert (tl_cache["blocks.1.hook_attn_out"] - ours.attn(1)).abs().max() > 1e-2
        mask = _mask("partial", len(ids))
        got = bridge_u.run_with_hooks(ids[None], fwd_hooks=lens.restore_hooks(tl_cache, "attn", (0, 2), mask,
                                                                              vanilla_model=pair.vanilla_hf))
    close(got, restore(pair, ids, {"attn"}, (0, 2), mask))
