"""Every input is checked before compute, and no flag is silently ignored: input files are parsed before any model
loads, --device is checked against the machine, toy-only and checkpoint-only flags are refused where they do not
apply, --dtype / --device / --questions are honoured on the toy world, and an unreadable toy cache file is rebuilt."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchlab
import patchlab.pair
import patchlab.toy
from patchlab.cli import add_model_args, device_arg
from patchlab.cli_pairs import toy_pair
from patchlab.pair.placement import check_device
from patchlab.tiny import tiny_model
from patchlab.unlearning import ReferenceSettings, unlearn
from tests.conftest import load_script


@pytest.fixture
def no_models(monkeypatch):
    """Every way a script loads a model fails the test: an input error must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module, name in ((patchlab, "load_pair"), (patchlab, "load_model"), (patchlab.pair, "load_model"),
                         (patchlab.pair, "load_pair"), (patchlab.toy, "pair"), (patchlab.toy, "vanilla")):
        monkeypatch.setattr(module, name, loaded)


@pytest.fixture
def files(tmp_path):
    """Bad input files: missing, not JSON, JSONL with a broken line, a record without question / text."""
    (tmp_path / "broken.jsonl").write_text('{"question": "who wrote it ?"}\n{"question": \n')
    (tmp_path / "notjson.json").write_text("questions: who ?")
    (tmp_path / "noquestion.jsonl").write_text('{"question": "who wrote it ?"}\n{"prompt": "where ?"}\n')
    (tmp_path / "badrecord.jsonl").write_text('{"text": "a paragraph"}\n{"title": "no text here"}\n')
    (tmp_path / "emptyanswer.jsonl").write_text('{"question": "who wrote it ?", "answer": " "}\n')
    (tmp_path / "ok.jsonl").write_text('{"question": "who wrote it ?", "answer": "Ilsa"}\n')
    (tmp_path / "task.json").write_text(json.dumps({"forget": ["a"], "retain": ["b"]}))
    return tmp_path


CKPT = ["--vanilla", "ckpt/vanilla", "--unlearned", "ckpt/unlearned"]

#: (script, arguments, what the error line says): one bad input file per case, found before any model loads.
BAD_INPUTS = [
    ("krs_sweep", [*CKPT, "--questions", "{d}/missing.jsonl"], "no such file: {d}/missing.jsonl"),
    ("krs_sweep", [*CKPT, "--questions", "{d}/broken.jsonl"], "broken.jsonl, line 2 is not valid JSONL"),
    ("krs_sweep", ["--questions", "{d}/noquestion.jsonl"], "record 1 has no non-empty 'question'"),
    ("krs_sweep", ["--compare", "{d}/missing.json"], "no such"),
    ("audit", ["--vanilla", "v", "--unlearned", "u", "--questions", "{d}/missing.jsonl"], "no such file"),
    ("audit", ["--vanilla", "v", "--unlearned", "u", "--questions", "{d}/ok.jsonl", "--unrelated",
               "{d}/noquestion.jsonl"], "noquestion.jsonl: unrelated question 1 is not a non-empty string"),
    ("audit", ["--questions", "{d}/emptyanswer.jsonl"], "target question 0 has an empty or non-string answer"),
    ("audit", ["--unrelated", "{d}/notjson.json"], "notjson.json is not valid JSON"),
    ("behavior", [*CKPT, "--target", "{d}/ok.jsonl", "--unrelated", "{d}/broken.jsonl"], "is not valid JSONL"),
    ("behavior", [*CKPT, "--target", "{d}/missing.jsonl", "--unrelated", "{d}/ok.jsonl"], "no such file"),
    ("unlearn", ["--model", "m", "--forget", "{d}/badrecord.jsonl"],
     "the forget set ({d}/badrecord.jsonl): record 1 is neither a string"),
    ("unlearn", ["--model", "m", "--forget", "{d}/ok.jsonl", "--retain", "{d}/missing.jsonl"], "no such file"),
    ("method_sweep", ["--vanilla", "v", "--task", "{d}/task.json"], "task.json: missing field 'target_questions'"),
    ("method_sweep", ["--vanilla", "v", "--task", "{d}/missing.json"], "no such task file"),
    ("wagle_density", ["--vanilla", "v", "--forget", "{d}/ok.jsonl", "--retain", "{d}/badrecord.jsonl"],
     "the retain set ({d}/badrecord.jsonl): record 1"),
    ("wagle_density", ["--vanilla", "v", "--forget", "{d}/notjson.json", "--retain", "{d}/ok.jsonl"],
     "is not valid JSON"),
]


@pytest.mark.parametrize("script, argv, message", BAD_INPUTS)
def test_bad_input_files_fail_before_any_model_loads(script, argv, message, files, no_models, capsys):
    argv = [a.format(d=files) for a in argv]
    code = load_script(script).main([*argv, "--out", str(files / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and message.format(d=files) in err and "Traceback" not in err


#: (script, arguments, what the error line says): a flag that would be ignored, refused before any model loads.
IGNORED_FLAGS = [
    ("krs_sweep", [*CKPT, "--questions", "{d}/ok.jsonl", "--concept", "X"], "--concept applies only to the toy"),
    ("krs_sweep", [*CKPT, "--questions", "{d}/ok.jsonl", "--method", "npo"], "--method applies only to the toy"),
    ("behavior", [*CKPT, "--target", "{d}/ok.jsonl", "--unrelated", "{d}/ok.jsonl", "--concept", "X"],
     "--concept applies only to the toy"),
    ("audit", ["--vanilla", "v", "--unlearned", "u", "--questions", "{d}/ok.jsonl", "--sanity", "--method", "npo"],
     "--method, --sanity apply only to the toy world"),
    ("audit", ["--labels", "a"], "--labels applies only to checkpoints"),
    ("audit", ["--retain", "r"], "--retain applies only to checkpoints"),
    ("param_cosine", [*CKPT, "--method", "npo"], "--method applies only to the toy world"),
    ("param_cosine", ["--top-tokens", "3"], "--top-tokens sets how many tokens --value-vectors N lists"),
    ("method_sweep", ["--vanilla", "v", "--task", "{d}/task.json", "--checkpoint", "c"],
     "--checkpoint applies only to the toy world"),
    ("method_sweep", ["--tokenizer", "t"], "--tokenizer applies only to checkpoints"),
    ("wagle_density", ["--tokenizer", "t"], "--tokenizer applies only to checkpoints"),
    ("unlearn", ["--model", "m", "--forget", "{d}/ok.jsonl", "--retain", "{d}/ok.jsonl", "--method", "ga"],
     "--retain: ga uses no retain set"),
    ("unlearn", ["--method", "npo", "--reference-device", "cpu"],
     "--reference-device places a held reference model; npo with --reference precompute holds none"),
    ("wagle_density", ["--vanilla", "v", "--forget", "{d}/ok.jsonl", "--retain", "{d}/ok.jsonl", "--concept", "X"],
     "--concept applies only to the toy world"),
]


@pytest.mark.parametrize("script, argv, message", IGNORED_FLAGS)
def test_flags_that_do_not_apply_are_refused_not_ignored(script, argv, message, files, no_models, capsys):
    argv = [a.format(d=files) for a in argv]
    code = load_script(script).main([*argv, "--out", str(files / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and message in err and "Traceback" not in err


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'"), ("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
    ("mps", r"MPS backend \(Apple GPUs\) is not available")])
def test_a_device_this_machine_lacks_is_refused(device, message, no_cuda):
    with pytest.raises(patchlab.PatchlabValueError, match=message):
        check_device(device)
    with pytest.raises(patchlab.PatchlabValueError, match=message):  # Python users get it from the loaders too
        patchlab.load_model(tiny_model("llama", 32), device=device)
    with pytest.raises(patchlab.PatchlabValueError, match=message):
        unlearn(tiny_model("llama", 32), ["a text"], tokenizer=object(), method="ga",
                reference=ReferenceSettings(device=device))
    with pytest.raises(patchlab.PatchlabValueError, match=message):
        patchlab.toy.pair(device=device)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        device_arg(device)
    assert check_device("cpu") == torch.device("cpu")


def test_an_out_of_range_cuda_index_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(patchlab.PatchlabValueError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")


@pytest.mark.parametrize("script, argv", [("unlearn", []), ("krs_sweep", []), ("unlearn", ["--reference-device"])])
def test_scripts_refuse_an_unavailable_device_at_parsing(script, argv, no_cuda, no_models, tmp_path, capsys):
    flags = argv + ["cuda"] if argv else ["--device", "cuda"]
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main([*flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: argument" in err and "CUDA is not available" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _toy_args(*flags: str) -> argparse.Namespace:
    parser = add_model_args(argparse.ArgumentParser())
    for name in ("--concept", "--method"):
        parser.add_argument(name)
    parser.add_argument("--quiet", action="store_true", default=True)
    return parser.parse_args(list(flags))


def test_toy_pair_honours_dtype_and_says_so():
    world, title = toy_pair(_toy_args("--dtype", "bfloat16", "--device", "cpu"))
    assert world.pair.vanilla_hf.dtype == torch.bfloat16 and world.pair.unlearned_hf.dtype == torch.bfloat16
    assert title == "toy world: Veltrani Codex (graddiff, bfloat16, cpu)"
    default, title = toy_pair(_toy_args())
    assert default.pair.vanilla_hf.dtype == torch.float32 and title == "toy world: Veltrani Codex (graddiff)"


def test_toy_audit_audits_the_given_questions(files):
    audit = load_script("audit")
    questions = [{"question": "who wrote the Veltrani Codex ?", "answer": "Ilsa Marrow"},
                 {"question": "where is the Veltrani Codex kept ?"}]
    (files / "mine.json").write_text(json.dumps(questions))
    args = audit.parse_args(["--questions", str(files / "mine.json"), "--unrelated", str(files / "ok.jsonl"),
                             "--dtype", "bfloat16", "--quiet"])
    [case] = audit.cases_from_args(args)
    assert [(q.question, q.answer) for q in case.questions] == [(q["question"], q.get("answer")) for q in questions]
    assert [q.question for q in case.unrelated] == ["who wrote it ?"]
    assert case.pair.vanilla_hf.dtype == torch.bfloat16 and case.retain.dtype == torch.bfloat16
    several = audit.parse_args(["--questions", str(files / "mine.json"), "--concept",
                                ",".join(patchlab.toy.concepts()[:2])])
    with pytest.raises(patchlab.PatchlabValueError, match="audit one toy concept with them"):
        audit.cases_from_args(several)


def test_an_unreadable_toy_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    from patchlab.toy import cache

    rebuilt = []

    def build(model, tokenizer, forget, retain, method, *, strength=1.0, progress=True):  # training: tested elsewhere
        rebuilt.append(method)
        return model

    monkeypatch.setattr(cache, "build_unlearned", build)
    world = patchlab.toy.world()
    weights = patchlab.toy.ASSETS / "model.safetensors"
    _, retain = cache.unlearn_data(world, patchlab.toy.DEFAULT_CONCEPT)
    path = cache.cached_path(world.record(patchlab.toy.DEFAULT_CONCEPT), "graddiff", retain, weights, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, tok = patchlab.toy.vanilla()
    build_args = (world, patchlab.toy.DEFAULT_CONCEPT, "graddiff", weights)
    cache.load_or_build(model, tok, *build_args, root=tmp_path, progress=False)  # writes the cache
    whole = path.read_bytes()
    expected = {k: v.clone() for k, v in load_file(path).items()}  # not views of the file truncated below
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted copy, a full disk...
    with pytest.warns(UserWarning, match=f"cached toy model {path} is unusable: it cannot be read"):
        cache.load_or_build(patchlab.toy.vanilla()[0], tok, *build_args, root=tmp_path, progress=False)
    rewritten = load_file(path)  # replaced by a whole file
    assert rewritten.keys() == expected.keys() and all(torch.equal(rewritten[k], v) for k, v in expected.items())
    assert rebuilt == ["graddiff", "graddiff"]

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(path))  # readable, but not this model's tensors
    with pytest.warns(UserWarning, match="holds other tensors than the toy model's"):
        cache.load_or_build(patchlab.toy.vanilla()[0], tok, *build_args, root=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole cache file loads without rebuilding
        cache.load_or_build(patchlab.toy.vanilla()[0], tok, *build_args, root=tmp_path, progress=False)
    assert len(rebuilt) == 3
