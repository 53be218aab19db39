"""Pairs placed with Accelerate device maps (disk offload on the CPU) and the placement helpers the engine uses."""

from __future__ import annotations

import copy

import pytest
import torch

import patchlab
from patchlab.pair import execution_device, input_device, parameter_value
from patchlab.pair.generation import greedy_answers
from patchlab.pair.placement import dispatch, is_dispatched, resolve_device_map
from patchlab.tiny import tiny_model
from tests.conftest import ATTN_OR_UP, CORPUS, QUESTIONS, perturbed

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h"}
DOWN = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}


def offload_map(model: torch.nn.Module, family: str) -> dict[str, str]:
    """Every top-level module on the CPU, decoder layers 1 and 2 on disk (their weights read at each forward)."""
    body = model.get_submodule(model.base_model_prefix)
    device_map = {f"{model.base_model_prefix}.{name}": "cpu" for name, _ in body.named_children()
                  if f"{model.base_model_prefix}.{name}" != LAYERS[family]}
    device_map.update({f"{LAYERS[family]}.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)})
    device_map["lm_head"] = "cpu"
    return device_map


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoints(request, vanilla_models, tok, tmp_path_factory):
    """The vanilla model is only read (the in-memory pairs place copies of it)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    vanilla = vanilla_models["gpt2"] if family == "gpt2" else tiny_model(family, len(tok), n_layers=4, n_heads=4,
                                                                         tie_embeddings=True)
    unlearned = perturbed(vanilla, ATTN_OR_UP)
    for name, model in (("vanilla", vanilla), ("unlearned", unlearned)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return family, root, vanilla, unlearned


def assert_same_forward(pair: patchlab.ModelPair, vanilla, unlearned, ids) -> None:
    for placed, whole in ((pair.vanilla_hf, vanilla), (pair.unlearned_hf, unlearned)):
        torch.testing.assert_close(placed(ids).logits, whole(ids).logits, atol=1e-5, rtol=0)


def test_disk_offloaded_pair_gives_the_in_memory_forward(checkpoints, tok, tmp_path):
    family, root, vanilla, unlearned = checkpoints
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    device_map = offload_map(vanilla, family)
    from_disk = patchlab.load_pair(root / "vanilla", root / "unlearned", device_map=device_map,
                                   offload_folder=tmp_path / "a")
    # in-memory models are placed in place (as device=/dtype= convert them): give copies
    in_memory = patchlab.load_pair(copy.deepcopy(vanilla), copy.deepcopy(unlearned), tokenizer=tok,
                                   device_map=device_map, offload_folder=tmp_path / "b")
    down = f"{LAYERS[family]}.1.{DOWN[family]}.weight"
    for pair in (from_disk, in_memory):
        assert pair.vanilla_hf.hf_device_map == pair.unlearned_hf.hf_device_map == device_map
        assert pair.unlearned_hf.get_parameter(down).device.type == "meta"  # really offloaded
        assert pair.device == torch.device("cpu")
        assert_same_forward(pair, vanilla, unlearned, ids)
        # the real weights of an offloaded module, as the engine's value restoration needs them
        assert torch.equal(parameter_value(pair.unlearned_hf, down), unlearned.get_parameter(down))
        assert torch.equal(parameter_value(pair.vanilla_hf, down), vanilla.get_parameter(down))
    # each model keeps its disk weights apart (in-memory models are written there; safetensors are read in place)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["unlearned", "vanilla"]
    assert any((tmp_path / "b" / "unlearned").iterdir())


def test_greedy_answers_on_an_offloaded_pair(checkpoints, tok, tmp_path):
    family, root, vanilla, unlearned = checkpoints
    pair = patchlab.load_pair(root / "vanilla", root / "unlearned", device_map=offload_map(vanilla, family),
                              offload_folder=tmp_path)
    placed = greedy_answers(pair.unlearned_hf, tok, QUESTIONS, max_new_tokens=4)
    whole = greedy_answers(unlearned, tok, QUESTIONS, max_new_tokens=4)
    assert all(torch.equal(a, b) for a, b in zip(placed[1], whole[1]))


def test_auto_device_map_shares_one_map_and_offloads_what_does_not_fit(checkpoints, tok, tmp_path):
    family, root, vanilla, unlearned = checkpoints
    size = sum(p.numel() * p.element_size() for p in vanilla.parameters())
    pair = patchlab.load_pair(root / "vanilla", root / "unlearned", device_map="auto",
                              max_memory={"cpu": size}, offload_folder=tmp_path)  # the pair gets one model's size
    assert pair.vanilla_hf.hf_device_map == pair.unlearned_hf.hf_device_map
    assert set(pair.vanilla_hf.hf_device_map.values()) == {"cpu", "disk"}
    assert_same_forward(pair, vanilla, unlearned, torch.tensor([tok(CORPUS[1]).input_ids]))
    with pytest.raises(patchlab.PatchlabValueError, match="offload_folder"):
        patchlab.load_pair(root / "vanilla", root / "unlearned", device_map="auto", max_memory={"cpu": size})


def test_execution_device_and_parameter_value_without_a_device_map(checkpoints):
    family, _, vanilla, _ = checkpoints
    down = f"{LAYERS[family]}.2.{DOWN[family]}"
    assert execution_device(vanilla) == input_device(vanilla) == torch.device("cpu")
    assert execution_device(vanilla, vanilla.get_submodule(down)) == execution_device(vanilla, down)
    assert torch.equal(parameter_value(vanilla, f"{down}.weight"), vanilla.get_parameter(f"{down}.weight"))
    assert not is_dispatched(vanilla)
    with pytest.raises(patchlab.PatchlabValueError, match="no module"):
        execution_device(vanilla, f"{LAYERS[family]}.9")
    with pytest.raises(patchlab.PatchlabValueError, match="not a module of"):
        execution_device(vanilla, torch.nn.Linear(2, 2))
    with pytest.raises(patchlab.PatchlabValueError, match="no parameter or buffer"):
        parameter_value(vanilla, f"{down}.nope")


def test_execution_device_follows_the_hook_not_the_storage(checkpoints, tmp_path):
    """An offloaded module computes on the map's main device; the hook says so even though its weights sit on meta."""
    family, _, vanilla, _ = checkpoints
    fresh = tiny_model(family, vanilla.config.vocab_size, n_layers=4, n_heads=4, tie_embeddings=family == "llama")
    model = dispatch(fresh, offload_map(vanilla, family), offload_folder=tmp_path)
    layer = f"{LAYERS[family]}.1"
    assert is_dispatched(model)
    assert next(model.get_submodule(layer).parameters()).is_meta
    assert execution_device(model, f"{layer}.{DOWN[family]}") == torch.device("cpu")
    with pytest.raises(patchlab.PatchlabValueError, match="already placed"):
        dispatch(model, offload_map(vanilla, family), offload_folder=tmp_path)
    with pytest.raises(patchlab.PatchlabValueError, match="cannot be moved"):
        patchlab.load_model(model, device="cpu")


def test_contradictory_placements_are_rejected(checkpoints, tok, tmp_path):
    family, root, vanilla, unlearned = checkpoints
    v, u = root / "vanilla", root / "unlearned"
    cases = [
        (dict(device="cpu", device_map="auto"), "not both"),
        (dict(max_memory={"cpu": "1GiB"}), "only applies with device_map"),
        (dict(offload_folder=tmp_path), "only applies with device_map"),
        (dict(device_map=offload_map(vanilla, family)), "offload_folder"),
        (dict(device_map="balanced_low_0"), "'auto' or a dict"),
        (dict(device_map={}), "empty"),
        (dict(device_map={f"{LAYERS[family]}.0": "cpu"}), "gives no device to"),
        (dict(device_map={"lm_head": "cpu", "nowhere": "cpu"}), "no module 'nowhere'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(patchlab.PatchlabValueError, match=match):
            patchlab.load_pair(v, u, **kwargs)
    assert resolve_device_map(vanilla, {"": "cpu"}) == {"": "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: layers on cuda:0, offloaded to the CPU and disk")
def test_gpu_map_with_cpu_and_disk_offload(checkpoints, tok, tmp_path):
    family, root, vanilla, unlearned = checkpoints
    device_map = {name: 0 if where == "cpu" else where for name, where in offload_map(vanilla, family).items()}
    device_map[f"{LAYERS[family]}.1"] = "cpu"  # offloaded to the CPU: weights in the hook, computed on cuda:0
    pair = patchlab.load_pair(root / "vanilla", root / "unlearned", device_map=device_map, offload_folder=tmp_path)
    whole = patchlab.load_pair(root / "vanilla", root / "unlearned", device="cuda")
    ids = torch.tensor([tok(CORPUS[0]).input_ids])
    assert pair.device == torch.device("cuda", 0)
    assert_same_forward(pair, whole.vanilla_hf, whole.unlearned_hf, ids.cuda())
    for layer in (1, 2):
        name = f"{LAYERS[family]}.{layer}.{DOWN[family]}"
        assert pair.unlearned_hf.get_parameter(f"{name}.weight").is_meta
        assert execution_device(pair.unlearned_hf, name) == torch.device("cuda", 0)
        value = parameter_value(pair.unlearned_hf, f"{name}.weight")
        assert value.device == torch.device("cuda", 0)
        assert torch.equal(value, whole.unlearned_hf.get_parameter(f"{name}.weight"))
    placed = greedy_answers(pair.unlearned_hf, tok, QUESTIONS, max_new_tokens=4)[1]
    assert all(torch.equal(a, b) for a, b in zip(placed, greedy_answers(whole.unlearned_hf, tok, QUESTIONS,
                                                                          max_new_tokens=4)[1]))
