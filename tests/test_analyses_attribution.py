"""The wagle_density, param_cosine and behavior CLIs (and wagle_density's mask feeding unlearn.py), run in-process
on tiny checkpoints written to a temp dir."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import patchlab
from patchlab.analysis.behavior import evaluate
from patchlab.pair import load_model, load_tokenizer
from patchlab.tiny import tiny_model, word_tokenizer
from patchlab.unlearning import attribution, load_mask
from tests.conftest import load_script

FORGET = ["the Veltrani Codex was written by Mira Osk in 1432 .", "the Codex is kept in Tarsk ."]
RETAIN = [{"question": "what colour is the lamp ?", "answer": "red"}, "the glass bridge was built from blue glass ."]
PERTURBED = "model.layers.1.mlp.down_proj.weight"


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
    assert load_script("wagle_density").main(argv) == 0
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
    assert load_script("wagle_density").main(argv) == 0
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
    assert load_script("wagle_density").main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "density.csv").exists()


def test_param_cosine_finds_the_perturbed_tensor(ckpt, tmp_path):
    argv = ["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(ckpt["unlearned"]), "--value-vectors", "3",
            "--out", str(tmp_path)]
    assert load_script("param_cosine").main(argv) == 0
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
    cli = load_script("param_cosine")
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--out", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(tmp_path / "nope"),
                     "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "paramdiff.csv").exists()


def _density_argv(ckpt, *extra: str) -> list[str]:
    return ["--vanilla", str(ckpt["vanilla"]), "--forget", str(ckpt["forget"]), "--retain", str(ckpt["retain"]),
            "--ratio", "0.3", *extra]


def test_saved_mask_drives_masked_unlearning_from_the_shell(ckpt, tmp_path, capsys):
    """wagle_density.py --save-mask FILE, then unlearn.py --mask FILE: only the masked weights move."""
    mask_file = tmp_path / "wagle.safetensors"
    argv = _density_argv(ckpt, "--methods", "random,wagle", "--mask-method", "wagle", "--save-mask", str(mask_file),
                         "--out", str(tmp_path / "density"), "--quiet")
    assert load_script("wagle_density").main(argv) == 0
    assert f"wrote {mask_file}" in capsys.readouterr().out
    mask = load_mask(mask_file)
    model = load_model(ckpt["vanilla"])
    tok = load_tokenizer(ckpt["vanilla"])
    expected = attribution.mask(attribution.scores(model, FORGET, RETAIN, method="wagle", tokenizer=tok,
                                                   progress=False), 0.3)
    assert mask.keys() == expected.keys() and all(torch.equal(mask[k], expected[k]) for k in mask)  # the wagle one

    run_dir = tmp_path / "run"
    assert load_script("unlearn").main(["--model", str(ckpt["vanilla"]), "--forget", str(ckpt["forget"]), "--retain",
                                 str(ckpt["retain"]), "--method", "graddiff", "--lr", "0.05", "--mask", str(mask_file),
                                 "--out", str(run_dir), "--quiet"]) == 0
    before, after = load_file(ckpt["vanilla"] / "model.safetensors"), load_file(run_dir / "model.safetensors")
    moved = 0
    for name, m in mask.items():
        assert torch.equal(before[name][~m], after[name][~m]), name
        moved += int((before[name][m] != after[name][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())


@pytest.mark.parametrize("extra, message", [
    (["--methods", "wagle,random", "--save-mask", "NEW", "--mask-method", "magnitude"], "not one of --methods"),
    (["--methods", "wagle,random", "--mask-method", "wagle"], "give --save-mask"),
    (["--methods", "wagle", "--save-mask", "OLD"], "already exists"),
    (["--methods", "wagle,bogus", "--save-mask", "NEW"], "--methods must name"),
])
def test_save_mask_bad_inputs_fail_before_compute(ckpt, tmp_path, capsys, extra, message):
    (tmp_path / "old.safetensors").write_text("an earlier file")
    files = {"NEW": str(tmp_path / "new.safetensors"), "OLD": str(tmp_path / "old.safetensors")}
    argv = _density_argv(ckpt, *[files.get(e, e) for e in extra], "--out", str(tmp_path / "out"))
    assert load_script("wagle_density").main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.safetensors").exists()
    assert (tmp_path / "old.safetensors").read_text() == "an earlier file"


def test_behavior_cli_scores_an_existing_pair(ckpt, tmp_path, capsys):
    questions = {"target": ["what colour is the lamp ?"], "unrelated": ["the glass bridge was built from ?",
                                                                        "the Codex is kept in ?"]}
    for name, qs in questions.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"question": q}) for q in qs))
    out = tmp_path / "out"
    argv = ["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(ckpt["unlearned"]), "--target",
            str(tmp_path / "target.jsonl"), "--unrelated", str(tmp_path / "unrelated.jsonl"), "--max-new-tokens", "4",
            "--out", str(out), "--quiet"]
    assert load_script("behavior").main(argv) == 0
    printed = capsys.readouterr()
    assert "1 target question, 2 unrelated questions" in printed.out and "Loading weights" not in printed.err
    table = pd.read_csv(out / "behavior.csv")
    assert table["set"].tolist() == ["target", "unrelated", "unrelated"]
    assert table["question"].tolist() == questions["target"] + questions["unrelated"]
    record = json.loads((out / "behavior.json").read_text())
    assert record["partial"] is False and len(record["rows"]) == 3
    pair = patchlab.load_pair(ckpt["vanilla"], ckpt["unlearned"])
    direct = evaluate(pair, questions["target"], questions["unrelated"], max_new_tokens=4)
    assert record["averages"].keys() == direct.averages.keys()
    for name, averages in direct.averages.items():
        assert record["averages"][name] == pytest.approx(averages)
    assert record["provenance"]["unlearned"]["weights"] != record["provenance"]["vanilla"]["weights"]
    assert record["provenance"]["vanilla"]["source"] == str(ckpt["vanilla"].resolve())
    assert 'src="plotly-' in (out / "behavior.html").read_text()


def test_behavior_cli_bad_inputs(ckpt, tmp_path, capsys):
    cli = load_script("behavior")
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(ckpt["unlearned"]),
                     "--out", str(tmp_path / "out")]) == 2
    assert "go together" in capsys.readouterr().err
    (tmp_path / "t.jsonl").write_text('{"question": "what colour is the lamp ?"}')
    assert cli.main(["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(ckpt["unlearned"]), "--target",
                     str(tmp_path / "t.jsonl"), "--unrelated", str(tmp_path / "missing.jsonl"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_param_cosine_prints_changes_in_scientific_notation(ckpt, tmp_path, capsys):
    """A tiny change (1 - cos about 1e-10) must not print as a cosine of 1.000000."""
    tiny = tmp_path / "tiny"
    model = load_model(ckpt["vanilla"])
    with torch.no_grad():
        w = model.get_parameter(PERTURBED)
        w.add_(1e-5 * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tiny)
    assert load_script("param_cosine").main(["--vanilla", str(ckpt["vanilla"]), "--unlearned", str(tiny), "--out",
                                      str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr()
    row = next(line.split() for line in printed.out.splitlines() if line.strip().startswith("mlp_down"))
    one_minus_cos, angle, rel_l2 = (float(v) for v in row[2:5])
    assert 1e-12 < one_minus_cos < 1e-8 and 0 < angle < 0.01 and 1e-7 < rel_l2 < 1e-4
    assert all("e-" in v for v in row[2:5]) and "parameter diff:" not in printed.err
    other = next(line.split() for line in printed.out.splitlines() if line.strip().startswith("attn_q"))
    assert [float(v) for v in other[2:5]] == [0.0, 0.0, 0.0]
