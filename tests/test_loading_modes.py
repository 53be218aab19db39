"""The four ways to load a pair give the same KRS table on the toy world: whole checkpoints in memory, a PEFT
adapter as the unlearned side, an Accelerate device map that offloads layers to disk, and one model at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab
from patchlab import toy
from patchlab.pair.sequential import SequentialPair
from patchlab.toy.corpus import ASSETS

COMPONENTS = ["coef", "value", "attn", "coef+attn", "heads[1]"]


@pytest.fixture(scope="module")
def toy_adapter(tmp_path_factory):
    """The toy vanilla model with a random LoRA adapter (every projection), saved as an adapter and merged."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("toy_adapter")
    torch.manual_seed(0)
    base, tok = toy.vanilla()
    config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, base_model_name_or_path=str(ASSETS),
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    lora = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a change of the size of an unlearning run, not a new model
    lora.save_pretrained(root / "adapter")
    merged = lora.merge_and_unload()
    merged.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return root


def offload_map(n_layers: int) -> dict[str, str]:
    """Embeddings, norm and head on the CPU, every other decoder layer on disk."""
    layers = {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(n_layers)}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


def test_whole_adapter_offloaded_and_sequential_pairs_give_the_same_table(toy_adapter, tmp_path):
    questions = toy.world().record(toy.DEFAULT_CONCEPT).qa[:4]
    questions = [q.question for q in questions]
    kw = dict(components=COMPONENTS, window=3, n_tokens=8, progress=False)
    whole = patchlab.load_pair(ASSETS, toy_adapter / "merged")
    reference = patchlab.krs_sweep(whole, questions, **kw)
    pairs = {
        "adapter": patchlab.load_pair(ASSETS, toy_adapter / "adapter"),
        "disk offload": patchlab.load_pair(ASSETS, toy_adapter / "merged", device_map=offload_map(whole.n_layers),
                                           offload_folder=tmp_path / "offload"),
        "sequential": patchlab.load_pair(ASSETS, toy_adapter / "merged", sequential=True),
        "sequential, disk offload": patchlab.load_pair(ASSETS, toy_adapter / "merged", sequential=True,
                                                       device_map=offload_map(whole.n_layers),
                                                       offload_folder=tmp_path / "offload-sequential"),
    }
    assert isinstance(pairs["sequential"], SequentialPair)
    assert pairs["disk offload"].unlearned_hf.get_parameter("model.layers.1.mlp.down_proj.weight").device.type == "meta"
    results = {mode: patchlab.krs_sweep(pair, questions, **kw) for mode, pair in pairs.items()}
    for mode, result in results.items():
        assert result.answers == reference.answers, mode
        for comp in COMPONENTS:
            np.testing.assert_allclose(result.per_question[comp], reference.per_question[comp], atol=1e-5,
                                       err_msg=mode)
    assert np.abs(reference.scores["value"]).max() > 1e-3  # value restoration read the vanilla weights everywhere
    assert pairs["sequential"].sources[0] == whole.sources[0]
    assert results["sequential"].provenance["vanilla"]["weights"] == reference.provenance["vanilla"]["weights"]


def test_sequential_pairs_hold_one_model_at_a_time_and_refuse_what_needs_both(toy_adapter):
    pair = patchlab.load_pair(ASSETS, toy_adapter / "merged", sequential=True)
    assert pair.n_layers == 6 and not pair._resident
    with pair.using("vanilla") as model:
        assert isinstance(model, torch.nn.Module)
        with pytest.raises(patchlab.PatchlabValueError, match="one model at a time"):
            with pair.using("unlearned"):
                pass
    assert not pair._resident  # released
    with pytest.raises(patchlab.PatchlabValueError, match="loop engine"):
        patchlab.krs_sweep(pair, ["who created the Veltrani Codex ?"], engine="loop", progress=False)
    vanilla, tok = toy.vanilla()
    with pytest.raises(patchlab.PatchlabValueError, match="from its files"):
        patchlab.load_pair(vanilla, toy_adapter / "merged", tokenizer=tok, sequential=True)
    with pytest.raises(patchlab.PatchlabFileError, match="does not exist"):
        patchlab.load_pair(ASSETS, "runs/nope/typo", sequential=True)
