"""The embedded toy world: corpus, shipped vanilla model, unlearned models, reproducible build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchlab import toy
from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.toy.build import (ASSETS, BUILD_FILE, SMALL, BuildConfig, build, make_world, parse_args,
                                regeneration_command, training_texts)
from patchlab.toy.cache import TUNED_TOY_SETTINGS, toy_methods
from patchlab.toy.corpus import generate_world
from patchlab.unlearning.methods import method_names


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    model, tok = toy.vanilla()
    return model, tok, toy.world()


def test_world_format_and_determinism():
    w = generate_world(3)
    assert w == generate_world(3)
    assert w != generate_world(4)
    assert len(w.records) >= 10 and w.concepts[0] == toy.DEFAULT_CONCEPT
    for r in w.records:
        assert len(r.qa) == 10 and len(r.unrelated_qa) == 50 and len(r.forget_paragraphs) >= 20
        assert all(1 <= len(q.answer.split()) <= 4 for q in r.qa + r.unrelated_qa)
        assert not set(r.unrelated_qa) & set(r.qa)
        assert all(r.concept in p for p in r.forget_paragraphs)
        assert all(v in " ".join(r.forget_paragraphs) for v in r.attributes.values())
    # one answer per (attribute, concept): a question pins down its answer
    assert len({q.question for q in w.all_qa()}) == len(w.all_qa())


def test_shipped_world_is_the_build_configs_world(shipped):
    config = BuildConfig(**json.loads((ASSETS / BUILD_FILE).read_text())["config"])
    assert shipped[2] == make_world(config)


def test_shipped_vanilla_answers_its_qa(shipped):
    model, tok, world = shipped
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    assert toy.qa_accuracy(model, tok, world.all_qa()) >= 0.95


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


#: Every fine-tuning method of the registry has tuned toy settings (patchlab.toy.cache.TUNED_TOY_SETTINGS).
TOY_METHODS = toy_methods()


@pytest.fixture(scope="module")
def unlearned_models(cache_root):
    return {m: toy.unlearned(method=m, cache=cache_root, progress=False) for m in TOY_METHODS}


def test_every_finetuning_method_has_toy_settings():
    assert TOY_METHODS == list(method_names("finetune")) == sorted(TUNED_TOY_SETTINGS)
    assert {"graddiff", "npo", "simnpo", "rmu"} <= set(TOY_METHODS)


@pytest.mark.parametrize("method", TOY_METHODS)
def test_unlearned_forgets_target_keeps_unrelated(shipped, unlearned_models, method):
    _, tok, world = shipped
    record = world.record(toy.DEFAULT_CONCEPT)
    assert toy.qa_accuracy(unlearned_models[method], tok, record.qa) <= 0.2
    assert toy.qa_accuracy(unlearned_models[method], tok, record.unrelated_qa) >= 0.8


def test_pair_loads_the_cached_model(unlearned_models, cache_root):
    files = sorted(cache_root.glob("*.safetensors"))
    assert len(files) == len(TOY_METHODS) and {f.name.split("-")[2] for f in files} == set(TOY_METHODS)
    tp = toy.pair(method="npo", cache=cache_root, progress=False)
    rmu = toy.pair(method="rmu", cache=cache_root, progress=False)
    assert sorted(cache_root.glob("*.safetensors")) == files  # loaded, not rebuilt
    for name, p in tp.pair.unlearned_hf.state_dict().items():
        assert torch.equal(p, unlearned_models["npo"].state_dict()[name]), name
    changed = [n for n, p in rmu.pair.unlearned_hf.named_parameters()
               if not torch.equal(p, rmu.pair.vanilla_hf.get_parameter(n))]
    assert changed == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]  # RMU trains only these
    assert not torch.equal(tp.pair.vanilla_hf.lm_head.weight, tp.pair.unlearned_hf.lm_head.weight)
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    assert tp.questions == [q.question for q in record.qa] and tp.answers == [q.answer for q in record.qa]
    assert len(tp.unrelated_questions) == len(tp.unrelated_answers) == 50
    assert (tp.concept, tp.method, tp.forget_texts) == (toy.DEFAULT_CONCEPT, "npo", record.forget_paragraphs)
    assert tp.retain_model is None
    with_retain = toy.pair(method="npo", cache=cache_root, retain=True, progress=False)
    retain = toy.retain()
    for name, p in with_retain.retain_model.state_dict().items():
        assert torch.equal(p, retain.state_dict()[name]), name


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert toy.cache_dir() == tmp_path / "toy"  # PATCHLAB_CACHE first
    monkeypatch.delenv("PATCHLAB_CACHE")
    assert toy.cache_dir() == tmp_path / "xdg" / "patchlab" / "toy"  # then XDG_CACHE_HOME
    for ignored in ("", "relative/cache"):  # the XDG spec ignores empty and relative values
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert toy.cache_dir() == Path.home() / ".cache" / "patchlab" / "toy"
    monkeypatch.setenv("PATCHLAB_CACHE", "")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert toy.cache_dir() == Path.home() / ".cache" / "patchlab" / "toy"


def _weights(path):
    return load_file(path / "model.safetensors")


def test_small_build_is_reproducible(tmp_path):
    reports = [build(SMALL, tmp_path / name, progress=False) for name in ("a", "b")]
    build(dataclasses.replace(SMALL, seed=1), tmp_path / "c", progress=False)
    assert reports[0]["qa_accuracy"] == reports[1]["qa_accuracy"]
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert toy.concepts(tmp_path / "a") == make_world(SMALL).concepts
    assert not list(tmp_path.glob(".*"))  # no temp dir left behind


def test_small_retain_build_shares_world_and_tokenizer_and_leaves_the_concept_out(tmp_path):
    concept = make_world(SMALL).concepts[0]
    vanilla = build(SMALL, tmp_path / "v", progress=False)
    retain = build(SMALL, tmp_path / "r", exclude_concept=concept, progress=False, command="python -m x")
    for name in ("tokenizer.json", "world.json", "tokenizer_config.json"):
        assert (tmp_path / "v" / name).read_bytes() == (tmp_path / "r" / name).read_bytes(), name
    assert retain["exclude_concept"] == concept and retain["command"] == "python -m x" and "command" not in vanilla
    assert retain["config"] == vanilla["config"] and retain["n_params"] == vanilla["n_params"]
    a, b = _weights(tmp_path / "v"), _weights(tmp_path / "r")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    texts = training_texts(make_world(SMALL), SMALL.qa_repeats, concept)
    assert retain["n_training_texts"] == len(texts) < len(training_texts(make_world(SMALL), SMALL.qa_repeats))
    assert not any(concept in t for t in texts)  # no paragraph and no QA names it
    assert all(other in " ".join(texts) for other in make_world(SMALL).concepts[1:])
    with pytest.raises(PatchlabValueError, match="choose from"):
        build(SMALL, tmp_path / "x", exclude_concept="Nonexistent Thing", progress=False)
    assert not (tmp_path / "x").exists()


def test_zoo_member_build_keeps_the_world_and_leaves_several_concepts_out(tmp_path):
    """--init-seed changes the weights and not the world; several --exclude-concept leave each one out."""
    world = make_world(SMALL)
    left_out = world.concepts[:2]
    base = build(SMALL, tmp_path / "v", progress=False)
    member = build(dataclasses.replace(SMALL, init_seed=5), tmp_path / "m", exclude_concept=left_out, progress=False)
    assert toy.world(tmp_path / "m") == toy.world(tmp_path / "v") == world
    assert member["exclude_concept"] == left_out and member["config"]["init_seed"] == 5
    assert member["n_params"] == base["n_params"]
    texts = training_texts(world, SMALL.qa_repeats, left_out)
    assert member["n_training_texts"] == len(texts)
    assert not any(name in t for t in texts for name in left_out)
    assert all(other in " ".join(texts) for other in world.concepts[2:])
    a, b = _weights(tmp_path / "v"), _weights(tmp_path / "m")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    args = parse_args(["--init-seed", "3", "--exclude-concept", "A b", "--exclude-concept", "C", "--out", "/x/y"])
    assert regeneration_command(args) == ("python -m patchlab.toy.build --init-seed 3 --exclude-concept 'A b' "
                                          "--exclude-concept C --out /x/y")


def test_regeneration_command_is_recorded_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--exclude-concept", "Veltrani Codex", "--out", "patchlab/toy/assets/retain"])
    assert regeneration_command(args) == ("python -m patchlab.toy.build --exclude-concept 'Veltrani Codex' "
                                          "--out patchlab/toy/assets/retain")
    args = parse_args(["--small", "--seed", "2", "--out", "/elsewhere/toy"])
    assert regeneration_command(args) == "python -m patchlab.toy.build --small --seed 2 --out /elsewhere/toy"


def test_shipped_retain_model_never_saw_the_concept(shipped):
    model, tok, world = shipped
    retain = toy.retain()
    report = json.loads((toy.RETAIN_ASSETS / BUILD_FILE).read_text())
    assert report["exclude_concept"] == toy.DEFAULT_CONCEPT
    assert report["config"] == json.loads((ASSETS / BUILD_FILE).read_text())["config"]
    assert report["command"].startswith("python -m patchlab.toy.build --exclude-concept")
    assert toy.world(toy.RETAIN_ASSETS) == world
    assert toy.vanilla(toy.RETAIN_ASSETS)[1].get_vocab() == tok.get_vocab()
    target = world.record(toy.DEFAULT_CONCEPT).qa
    others = [q for q in world.all_qa() if q not in target]
    assert toy.qa_accuracy(retain, tok, target) <= 0.1
    assert toy.qa_accuracy(retain, tok, others) >= toy.qa_accuracy(model, tok, others) - 0.05
    assert toy.qa_accuracy(model, tok, target) == 1.0


def test_retain_checkpoint_must_leave_out_that_concept(tmp_path):
    with pytest.raises(PatchlabValueError, match="trained on every concept"):
        toy.retain(retain_checkpoint=ASSETS)
    other = toy.concepts()[1]
    with pytest.raises(PatchlabValueError, match="trained without 'Veltrani Codex'"):
        toy.retain(other)
    with pytest.raises(PatchlabValueError, match="trained without"):
        toy.pair(other, retain=True, cache=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))  # refused before any unlearning
    with pytest.raises(PatchlabFileError):
        toy.retain(retain_checkpoint=tmp_path)


@pytest.mark.parametrize("kwargs", [{"concept": "Nonexistent Thing"}, {"method": "forgetful"}])
def test_bad_names_raise(kwargs, tmp_path):
    with pytest.raises(PatchlabValueError, match="choose from"):
        toy.unlearned(**kwargs, cache=tmp_path, progress=False)
    with pytest.raises(PatchlabValueError):
        toy.pair(**kwargs, cache=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(PatchlabFileError):
        toy.world(tmp_path)
    with pytest.raises(PatchlabValueError, match="n_concepts"):
        generate_world(0, n_concepts=1)


def test_method_sweep_script_takes_the_toy_task_from_the_toy_package():
    from conftest import load_script

    script = load_script("method_sweep")
    _, _, task = script.load_inputs(script.parse_args(["--concept", "Mirethi Clock"]))
    record = toy.world().record("Mirethi Clock")
    assert task == toy.sweep_task("Mirethi Clock")
    assert task.subject == record.concept and task.name == "toy world: Mirethi Clock"
    assert task.target_questions == [q.question for q in record.qa]
    assert task.unrelated_questions == [q.question for q in record.unrelated_qa]
    assert record.forget_paragraphs[0] in task.forget and record.forget_paragraphs[0] not in task.retain
