"""analyses/krs_sweep.py on saved checkpoints: writes its three files; bad inputs give a clear error, no file.
Also the helpers of patchlab.cli that every script shares."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import patchlab
from patchlab.cli import add_model_args, model_kwargs, run
from patchlab.cli_pairs import add_pair_args, pair_kwargs
from patchlab.reports import figures
from tests.conftest import ATTN_OR_UP, QUESTIONS, load_script, perturbed


@pytest.fixture(scope="module")
def cli():
    return load_script("krs_sweep")


@pytest.fixture(scope="module")
def checkpoints(vanilla_models, tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    vanilla = vanilla_models["llama"]
    for name, model in (("vanilla", vanilla), ("unlearned", perturbed(vanilla, ATTN_OR_UP))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "questions.jsonl").write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS))
    return root


def test_cli_writes_result_table_and_heatmap(cli, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned"),
                     "--questions", str(checkpoints / "questions.jsonl"), "--components", "coef,attn,coef+attn",
                     "--window", "3", "--n-tokens", "4", "--out", str(out)])
    assert code == 0
    result = patchlab.KRSResult.load(out / "krs.json")
    assert result.components == ["coef", "attn", "coef+attn"] and len(result.questions) == len(QUESTIONS)
    assert (out / "krs.csv").read_text().startswith("component,window,layers,start,stop,krs")
    assert "plotly" in (out / "krs.html").read_text()[:100000].lower()
    assert "coef+attn" in capsys.readouterr().out
    code = cli.main(["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned"),
                     "--questions", str(checkpoints / "questions.jsonl"), "--components", "attn", "--window", "3",
                     "--n-tokens", "4", "--aggregate", "pooled", "--out", str(out / "pooled")])
    assert code == 0
    pooled = patchlab.KRSResult.load(out / "pooled" / "krs.json").pooled()["attn"]
    printed = capsys.readouterr().out.split("attn", 1)[1].split()[:len(pooled)]
    np.testing.assert_allclose([float(v) for v in printed], pooled, atol=5e-4)


@pytest.mark.parametrize("bad, match", [
    (["--questions", "missing.jsonl"], "no such file"),
    (["--window", "99"], "window"),
    (["--components", "coef,mlp"], "unknown component"),
    (["--unlearned", "/nonexistent/ckpt"], "does not exist"),
    (["--metric", "nope"], "unknown metric 'nope'; choose from krs"),
])
def test_cli_reports_bad_inputs(cli, checkpoints, tmp_path, capsys, bad, match):
    args = {"--vanilla": str(checkpoints / "vanilla"), "--unlearned": str(checkpoints / "unlearned"),
            "--questions": str(checkpoints / "questions.jsonl"), "--n-tokens": "3", "--window": "2",
            "--out": str(tmp_path / "out")}
    args.update(dict(zip(bad[::2], bad[1::2])))
    if args["--questions"] == "missing.jsonl":
        args["--questions"] = str(tmp_path / "missing.jsonl")
    code = cli.main([x for kv in args.items() for x in kv])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_labels_windows_by_span_and_writes_the_comparison_beside_the_sweep(cli, checkpoints, tmp_path, capsys):
    """The printed table and --compare label windows by their layers ("0-1"), as the heatmaps do; the comparison
    is krs_comparison.* in --out itself, its page sharing the sweep's one plotly.js file."""
    argv = ["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned"), "--questions",
            str(checkpoints / "questions.jsonl"), "--components", "attn", "--window", "3", "--n-tokens", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "b"), "--compare", str(tmp_path / "a" / "krs.json"),
                     "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    spans = [figures.window_label(w) for w in patchlab.KRSResult.load(tmp_path / "a" / "krs.json").windows]
    assert [line.split() for line in printed if line.startswith("layers")] == [["layers", *spans]] * 2
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"krs_comparison.json", "krs_comparison.csv", "krs_comparison.html"} <= set(files)
    assert "comparison" not in files and len([f for f in files if f.endswith(".js")]) == 1
    wrote = [line for line in printed if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'b' / name}" for name in
                     ["krs.json", "krs.csv", "krs_per_question.csv", "krs.html", "krs_per_question.html",
                      "krs_comparison.json", "krs_comparison.csv", "krs_comparison.html"]]


def test_cli_requires_questions_with_explicit_models(cli, checkpoints, capsys):
    assert cli.main(["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned")]) == 2
    assert "--questions" in capsys.readouterr().err


def test_run_turns_patchlab_errors_into_status_2(capsys):
    def bad() -> None:
        raise patchlab.PatchlabFileError("no such file: x.json")

    assert run(lambda: print("done")) == 0 and capsys.readouterr().out == "done\n"
    assert run(bad) == 2
    assert capsys.readouterr().err == "error: no such file: x.json\n"
    with pytest.raises(KeyError):  # a bug is not an input error: it keeps its traceback
        run(lambda: {}["missing"])
    with pytest.raises(patchlab.PatchlabValueError, match="callable"):
        run("not a function")


def test_model_args_give_load_model_kwargs():
    parser = add_model_args(argparse.ArgumentParser())
    assert model_kwargs(parser.parse_args([])) == {"dtype": None, "device": None}
    assert model_kwargs(parser.parse_args(["--dtype", "bfloat16", "--device", "cpu"])) == {
        "dtype": torch.bfloat16, "device": "cpu"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    with pytest.raises(patchlab.PatchlabValueError, match="dtype must be one of"):
        model_kwargs(argparse.Namespace(dtype="int8", device=None))
    with pytest.raises(patchlab.PatchlabValueError, match="add_model_args"):
        model_kwargs(argparse.Namespace(dtype=None))
    with pytest.raises(patchlab.PatchlabValueError, match="ArgumentParser"):
        add_model_args(None)


def test_cli_passes_dtype_and_device_to_the_loader(cli, checkpoints, monkeypatch, capsys):
    seen = {}

    def load_pair(*args, **kwargs):
        seen.update(kwargs)
        raise patchlab.PatchlabValueError("stop here")

    monkeypatch.setattr(cli.patchlab, "load_pair", load_pair)
    assert cli.main(["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned"),
                     "--questions", str(checkpoints / "questions.jsonl"), "--dtype", "bfloat16",
                     "--device", "cpu"]) == 2
    assert seen == {"tokenizer": None, "dtype": torch.bfloat16, "device": "cpu", "device_map": None,
                    "max_memory": None, "offload_folder": None, "sequential": False, "adapter_base": None}
    assert "stop here" in capsys.readouterr().err


def test_pair_args_parse_device_maps_and_memory_budgets():
    parser = add_pair_args(add_model_args(argparse.ArgumentParser()))
    kwargs = pair_kwargs(parser.parse_args(["--device-map", '{"": "cpu"}', "--max-memory", "0=70GiB, cpu=100GiB",
                                            "--offload-folder", "off", "--sequential", "--adapter-base", "base"]))
    assert kwargs == {"dtype": None, "device": None, "device_map": {"": "cpu"}, "max_memory": {0: "70GiB",
                      "cpu": "100GiB"}, "offload_folder": "off", "sequential": True, "adapter_base": "base"}
    assert pair_kwargs(parser.parse_args(["--device-map", "auto"]))["device_map"] == "auto"
    with pytest.raises(patchlab.PatchlabValueError, match="--device-map must be 'auto' or a JSON"):
        pair_kwargs(parser.parse_args(["--device-map", "balanced{"]))
    with pytest.raises(patchlab.PatchlabValueError, match="--max-memory must look like"):
        pair_kwargs(parser.parse_args(["--max-memory", "70GiB"]))
    only_adapter = add_pair_args(argparse.ArgumentParser(), placement=False)
    with pytest.raises(SystemExit):
        only_adapter.parse_args(["--sequential"])


@pytest.mark.parametrize("flags, named", [(["--sequential"], "--sequential applies only"),
                                          (["--tokenizer", "t", "--device-map", "auto"], "--tokenizer, --device-map")])
def test_checkpoint_flags_on_the_toy_world_are_refused_not_ignored(cli, flags, named, tmp_path, capsys):
    assert cli.main([*flags, "--out", str(tmp_path / "o")]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_sequential_pair_gives_the_whole_pair_numbers(cli, checkpoints, tmp_path):
    common = ["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned"),
              "--questions", str(checkpoints / "questions.jsonl"), "--components", "coef,value,attn",
              "--window", "3", "--n-tokens", "4", "--quiet"]
    assert cli.main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert cli.main([*common, "--sequential", "--device-map", '{"": "cpu"}', "--out", str(tmp_path / "seq")]) == 0
    whole, seq = (patchlab.KRSResult.load(tmp_path / name / "krs.json") for name in ("whole", "seq"))
    for component in ("coef", "value", "attn"):
        np.testing.assert_allclose(seq.krs[component], whole.krs[component], atol=1e-5)
