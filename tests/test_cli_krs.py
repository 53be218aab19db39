"""analyses/krs_sweep.py on saved checkpoints: writes its three files; bad inputs give a clear error, no file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import patchlab
from tests.conftest import ATTN_OR_UP, QUESTIONS, perturbed

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "krs_sweep.py"


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("krs_sweep_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert (out / "krs.csv").read_text().startswith("component,window,start,stop,krs")
    assert "plotly" in (out / "krs.html").read_text()[:100000].lower()
    assert "coef+attn" in capsys.readouterr().out


@pytest.mark.parametrize("bad, match", [
    (["--questions", "missing.jsonl"], "no such file"),
    (["--window", "99"], "window"),
    (["--components", "coef,mlp"], "unknown component"),
    (["--unlearned", "/nonexistent/ckpt"], "does not exist"),
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


def test_cli_requires_questions_with_explicit_models(cli, checkpoints, capsys):
    assert cli.main(["--vanilla", str(checkpoints / "vanilla"), "--unlearned", str(checkpoints / "unlearned")]) == 2
    assert "--questions" in capsys.readouterr().err
