"""The README's open-unlearning commands end to end, in-process, on a fixture saved in open-unlearning's layout:
TOFU's forget10 / forget10_perturbed / retain_perturbed splits as saved ``datasets`` directories, the fine-tuned
("full") model and the retain90 model under ``saves/finetune/``, the unlearned model under ``saves/unlearn/``, every
tokenizer with a chat template. The toy world stands in for TOFU and its models."""

from __future__ import annotations

import copy
import json
import shutil

import datasets
import numpy as np
import pytest

import patchlab
from patchlab import toy
from patchlab.pair import load_tokenizer
from patchlab.pair.generation import DEFAULT_TEMPLATE, chat_template, resolve_template
from patchlab.toy.corpus import ASSETS
from patchlab.toy.tofu import tofu_splits
from tests.conftest import load_script

#: A chat template that renders one user turn as patchlab's default prompt (so the chat prompt is checkable).
CHAT = ("{% for m in messages %}Question: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %} Answer:{% endif %}")
TASK = "tofu_Toy_forget10_GradDiff"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """``{name: path}`` of the fixture: tofu/forget10, tofu/forget10_perturbed, tofu/retain_perturbed, full,
    retain90, unlearned."""
    root = tmp_path_factory.mktemp("open_unlearning")
    world = toy.pair(progress=False)
    splits = tofu_splits(toy.world(), toy.DEFAULT_CONCEPT)
    paths = {"full": root / "saves/finetune/tofu_Toy_full", "retain90": root / "saves/finetune/tofu_Toy_retain90",
             "unlearned": root / f"saves/unlearn/{TASK}"}
    shutil.copytree(ASSETS, paths["full"], ignore=shutil.ignore_patterns("retain"))
    shutil.copytree(ASSETS / "retain", paths["retain90"])
    world.pair.unlearned_hf.save_pretrained(paths["unlearned"])
    tok = copy.deepcopy(world.pair.tokenizer)  # the toy world's own stays without a chat template
    tok.chat_template = CHAT
    for path in paths.values():
        tok.save_pretrained(path)
    plain = [{k: r[k] for k in ("question", "answer")} for r in splits["forget"]]
    for name, records in (("forget10", plain), ("forget10_perturbed", splits["forget"]),
                          ("retain_perturbed", splits["retain"])):
        paths[f"tofu/{name}"] = root / "tofu" / name
        datasets.Dataset.from_list(records).save_to_disk(str(paths[f"tofu/{name}"]))
    return {k: str(v) for k, v in paths.items()}


def test_the_chat_template_becomes_a_prompt_template(layout):
    tok = load_tokenizer(layout["full"])
    assert chat_template(tok) == resolve_template("chat", tok) == DEFAULT_TEMPLATE
    assert resolve_template("default") == DEFAULT_TEMPLATE
    assert resolve_template("Q: {question} A:") == "Q: {question} A:"
    with pytest.raises(patchlab.PatchlabValueError, match="has no chat template"):
        chat_template(toy.pair(progress=False).pair.tokenizer)
    with pytest.raises(patchlab.PatchlabValueError, match="holding \\{question\\}"):
        resolve_template("Question:")


def test_krs_sweep_command(layout, tmp_path, capsys):
    krs = load_script("krs_sweep")
    args = ["--vanilla", layout["full"], "--unlearned", layout["unlearned"], "--questions",
            layout["tofu/forget10_perturbed"], "--quiet"]
    assert krs.main([*args, "--template", "chat", "--out", str(tmp_path / "chat")]) == 0
    assert krs.main([*args, "--out", str(tmp_path / "plain")]) == 0
    chat, plain = (patchlab.load_result(tmp_path / d / "krs.json") for d in ("chat", "plain"))
    assert chat.settings["prompt_template"] == DEFAULT_TEMPLATE  # the fixture's chat template renders it
    for comp in plain.components:
        np.testing.assert_allclose(chat.per_question[comp], plain.per_question[comp], atol=1e-6)
    capsys.readouterr()
    assert krs.main([*args, "--template", "Question:", "--out", str(tmp_path / "bad")]) == 2
    assert "error: a prompt template is one of default, chat or a text holding {question}" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "krs.json").exists()


def test_behavior_command_adds_tofu_metrics(layout, tmp_path, capsys):
    behavior = load_script("behavior")
    out = tmp_path / "behavior"
    assert behavior.main(["--vanilla", layout["full"], "--unlearned", layout["unlearned"],
                          "--target", layout["tofu/forget10_perturbed"], "--unrelated", layout["tofu/retain_perturbed"],
                          "--template", "chat", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "prob " in printed and "truth_ratio " in printed
    saved = json.loads((out / "behavior.json").read_text())
    assert saved["likelihood"] == ["prob", "truth_ratio"]
    target = saved["averages"]["target"]
    assert target["prob_after"] < target["prob_before"]  # the unlearned model lost the forget answers
    assert 0 <= target["truth_ratio_after"] <= 1
    # questions without TOFU's fields: behaviour only (forget10 has answers but no perturbed answers)
    assert behavior.main(["--vanilla", layout["full"], "--unlearned", layout["unlearned"],
                          "--target", layout["tofu/forget10"], "--unrelated", layout["tofu/forget10"],
                          "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert json.loads((tmp_path / "plain" / "behavior.json").read_text())["likelihood"] == ["prob"]


def test_audit_command_with_the_retain_model(layout, tmp_path, capsys):
    audit = load_script("audit")
    out = tmp_path / "audit"
    assert audit.main(["--vanilla", layout["full"], "--unlearned", layout["unlearned"], "--retain", layout["retain90"],
                       "--questions", layout["tofu/forget10_perturbed"], "--unrelated",
                       layout["tofu/retain_perturbed"], "--template", "chat", "--probes", "krs,uds,behavior",
                       "--out", str(out), "--quiet"]) == 0
    (run,) = patchlab.load_result(out / "audit.json").runs
    assert run.provenance["settings"]["common"]["template"] == DEFAULT_TEMPLATE
    assert set(run.results) == {"krs", "uds", "behavior"}
    assert run.results["uds"].verdict == "erased"  # graddiff removes the answer as deeply as the retain model
    capsys.readouterr()
    assert audit.main(["--template", "chat", "--out", str(tmp_path / "toy"), "--quiet"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_unlearn_command_trains_with_the_chat_template(layout, tmp_path):
    unlearn = load_script("unlearn")
    out = tmp_path / "npo"
    assert unlearn.main(["--model", layout["full"], "--forget", layout["tofu/forget10_perturbed"], "--method", "ga",
                         "--epochs", "1", "--template", "chat", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "unlearn_run.json").read_text())["settings"]["template"] == DEFAULT_TEMPLATE
