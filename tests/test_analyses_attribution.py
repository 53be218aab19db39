"""The wagle_density and param_cosine CLIs, run in-process on tiny checkpoints written to a temp dir."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from patchlab.tiny import tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FORGET = ["the Veltrani Codex was written by Mira Osk in 1432 .", "the Codex is kept in Tarsk ."]
RETAIN = [{"question": "what colour is the lamp ?", "answer": "red"}, "the glass bridge was built from blue glass ."]
PERTURBED = "model.layers.1.mlp.down_proj.weight"


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA checkpoint, a copy with one perturbed tensor, and forget/retain JSON files."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = word_tokenizer(FORGET + [r if isinstance(r, str) else f"Question: {r['question']}\n Answer: {r['answer']}"
                                   for r in RETAIN])
    model = tiny_model("llama", len(tok), n_layers=2)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_parameter(PERTURBED).add_(0.5 * torch.randn(other.get_parameter(PERTURBED).shape,
                                                              generator=torch.Generator().manual_seed(1)))
    for name, m in (("vanilla", model), ("unlearned", other)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "forget.json").write_text(json.dumps(FORGET))
    (root / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in RETAIN))
    return {"root": root, "vanilla": root / "vanilla", "unlearned": root / "unlearned",
            "forget": root / "forget.json", "retain": root / "retain.jsonl"}


def test_wagle_density_selects_exact_ratio_per_method(ckpt, tmp_path, capsys):
    argv = ["--vanilla", str(ckpt["vanilla"]), "--forget", str(ckpt["forget"]), "--retain", str(ckpt["retain"]),
            "--methods", "wagle,magnitude,random", "--ratio", "0.3", "--out", str(tmp_path)]
    assert _cli("wagle_density").main(argv) == 0
    table = pd.read_csv(tmp_path / "density.csv")
    assert set(table["method"]) == {"wagle", "magnitude", "random"}
    for method, part in table.groupby("method"):
        # these methods score every parameter, so the global selection is exactly round(0.3 * all weights)
        assert part["selected"].sum() == round(0.3 * part["total"].sum()), method
        assert ((part["density"] >= 0) & (part["density"] <= 1)).all()
    per_module = pd.read_csv(tmp_path / "density_modules.csv")
    assert (per_module.groupby("method")["selected"].sum() == table.groupby("method")["selected"].sum()).all()
    for page in ("density_modules.html", "density_layers.html"):
        assert "plotly" in (tmp_path / page).read_text()
    assert "wrote" in capsys.readouterr().out


def test_wagle_density_per_layer_and_wanda(ckpt, tmp_path):
    argv = ["--vanilla", str(ckpt["vanilla"]), "--forget", str(ckpt["forget"]), "--retain", str(ckpt["retain"]),
            "--methods", "wanda", "--ratio", "0.5", "--per-layer", "--out", str(tmp_path)]
    assert _cli("wagle_density").main(argv) == 0
    table = pd.read_csv(tmp_path / "density.csv")
    # wanda scores only linear weights: norms and the (untied) embedding stay unselected
    assert table.loc[table["module"].isin(["norm", "embedding"]), "selected"].sum() == 0
    layered = table[table["layer"].notna() & (table["module"] != "norm")]
    for layer, part in layered.groupby("layer"):
        assert abs(part["selected"].sum() / part["total"].sum() - 0.5) < 1e-3, layer


@pytest.mark.parametrize("drop, message", [("--retain", "go together"), (None, "no such file")])
def test_wagle_density_bad_inputs(ckpt, tmp_path, capsys, drop, message):
    args = {"--vanilla": str(ckpt["vanilla"]), "--forget": str(ckpt["forget"]), "--retain": str(ckpt["retain"])}
    if drop is None:
        args["--forget"] = str(tmp_path / "missing.json")
    else:
        del args[drop]
    argv = [x for kv in args.items() for x in kv] + ["--out", str(tmp_path)]
    assert _cli("wagle_density").main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "density.csv").exists()


def test_param_cosine_finds_the_perturbed_tensor(ckpt, tmp_path):
    argv = ["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(ckpt["unlearned"]), "--value-vectors", "3",
            "--out", str(tmp_path)]
    assert _cli("param_cosine").main(argv) == 0
    table = pd.read_csv(tmp_path / "paramdiff.csv")
    changed = table[table["cosine"] < 1 - 1e-9]
    assert changed["name"].tolist() == [PERTURBED]
    assert (table.loc[table["name"] != PERTURBED, "rel_l2"] == 0).all()
    layers = pd.read_csv(tmp_path / "paramdiff_layers_cosine.csv").set_index("layer")
    assert layers.loc[1, "mlp_down"] < 1 and (layers.drop(columns="mlp_down") > 1 - 1e-9).all().all()
    assert (layers.loc[0] > 1 - 1e-9).all()
    values = pd.read_csv(tmp_path / "value_vectors.csv")
    assert len(values) == 3 and (values["layer"] == 1).all() and (values["cosine"] < 1).all()
    for metric in ("cosine", "rel_l2"):
        assert "plotly" in (tmp_path / f"paramdiff_{metric}.html").read_text()


def test_param_cosine_bad_inputs(ckpt, tmp_path, capsys):
    cli = _cli("param_cosine")
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--out", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(tmp_path / "nope"),
                     "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "paramdiff.csv").exists()
