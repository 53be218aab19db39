"""``--plugin MODULE``: a module outside the package registers a metric, an unlearning method, an attribution
scorer and a probe, and every analyses/ script sees them (choices, flags, runs) without any edit to patchlab."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import patchlab
from patchlab.patching.metrics import RECOVERY_METRICS
from patchlab.probes import PROBES
from patchlab.tiny import tiny_model
from patchlab.unlearning.attribution import SCORERS
from patchlab.unlearning.methods import UNLEARNING_METHODS
from tests.conftest import QUESTIONS, load_script

PLUGIN = textwrap.dedent('''
    """A user's registrations, outside patchlab."""
    from dataclasses import dataclass

    import plotly.graph_objects as go

    import patchlab
    from patchlab.probes import Interval, Probe, ProbeResult, register_probe
    from patchlab.unlearning import Method, register_method
    from patchlab.unlearning.attribution import register_scorer


    def gap(restored, refs):
        """negated mean |restored - source| logit gap"""
        return -(restored.float() - refs.source.to(restored.device)).abs().mean(dim=(-1, -2))


    patchlab.register_metric("plugin_gap", gap)


    @dataclass(frozen=True)
    class Settings:
        """Attributes:
            plugin_scale: multiplies the forget NLL (dimensionless)."""
        plugin_scale: float = 1.0


    register_method(Method(name="plugin_ga", kind="finetune", settings=Settings, summary="-scale NLL(f)",
                           loss=lambda step, s: -s.plugin_scale * step.nll(step.forget)))
    register_scorer("plugin_ones", lambda model, inputs: {n: p.detach().float().abs() * 0 + 1
                                                          for n, p in model.named_parameters()})


    def run(pair, questions, *, unrelated, retain, settings, progress, baselines):
        return ProbeResult(probe="plugin_probe", score=Interval(0.5, 0.4, 0.6), meaning="a constant",
                           verdict="hidden", rule="always hidden", details={"knob": settings["plugin_knob"]})


    register_probe(Probe(name="plugin_probe", title="Plugin probe", run=run, defaults={"plugin_knob": 3},
                         draw=lambda results: go.Figure()))
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin file (outside the package); the registries are restored after the test."""
    for registry in (RECOVERY_METRICS, PROBES, SCORERS, UNLEARNING_METHODS):
        monkeypatch.setattr(registry, "_entries", dict(registry.items()))
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    yield path
    for name in [m for m in sys.modules if m.startswith("patchlab_plugin_my_plugin")]:
        del sys.modules[name]


@pytest.fixture
def checkpoint(tok, tmp_path):
    model = tiny_model("llama", len(tok), n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, seed=0)
    for name in ("vanilla", "unlearned"):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS))
    (tmp_path / "forget.jsonl").write_text("\n".join(json.dumps({"text": q}) for q in QUESTIONS))
    return tmp_path


def test_plugin_method_reaches_unlearn_choices_flags_and_run(plugin, checkpoint, tmp_path, capsys):
    cli = load_script("unlearn")
    with pytest.raises(SystemExit):
        cli.main(["--plugin", str(plugin), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "plugin_ga" in help_text and "--plugin-scale" in help_text and "--plugin MODULE" in help_text
    out = tmp_path / "out"
    assert cli.main(["--plugin", str(plugin), "--model", str(checkpoint / "vanilla"), "--forget",
                     str(checkpoint / "forget.jsonl"), "--method", "plugin_ga", "--plugin-scale", "2", "--lr", "1e-3",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    saved = json.loads((out / "unlearn_run.json").read_text())
    assert saved["settings"]["method"] == "plugin_ga" and saved["settings"]["plugin_scale"] == 2.0


def test_plugin_method_without_toy_settings_unlearns_the_toy_world(plugin, tmp_path, capsys):
    from patchlab.toy.cache import TOY_TRAINING, TUNED_TOY_SETTINGS

    assert "plugin_ga" not in TUNED_TOY_SETTINGS
    out = tmp_path / "toy"
    assert load_script("unlearn").main(["--plugin", str(plugin), "--method", "plugin_ga", "--epochs", "1",
                                        "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    saved = json.loads((out / "unlearn_run.json").read_text())["settings"]
    assert (saved["lr"], saved["batch_size"], saved["epochs"]) == (TOY_TRAINING["lr"], TOY_TRAINING["batch_size"], 1)
    assert saved["method"] == "plugin_ga" and saved["plugin_scale"] == 1.0


def test_plugin_metric_reaches_krs_sweep(plugin, checkpoint, tmp_path, capsys):
    cli = load_script("krs_sweep")
    argv = ["--vanilla", str(checkpoint / "vanilla"), "--unlearned", str(checkpoint / "unlearned"), "--questions",
            str(checkpoint / "questions.jsonl"), "--components", "attn", "--window", "2", "--n-tokens", "3",
            "--metric", "plugin_gap", "--out", str(tmp_path / "krs"), "--quiet"]
    assert cli.main(["--plugin", str(plugin), *argv]) == 0, capsys.readouterr().err
    assert patchlab.KRSResult.load(tmp_path / "krs" / "krs.json").metric == "plugin_gap"


def test_plugin_probe_reaches_audit(plugin, checkpoint, tmp_path, capsys):
    cli = load_script("audit")
    out = tmp_path / "audit"
    assert cli.main(["--plugin", str(plugin), "--vanilla", str(checkpoint / "vanilla"), "--unlearned",
                     str(checkpoint / "unlearned"), "--questions", str(checkpoint / "questions.jsonl"),
                     "--probes", "plugin_probe", "--n-tokens", "3", "--probe-setting", "plugin_probe.plugin_knob=5",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert "plugin_probe" in capsys.readouterr().out
    assert '"knob": 5' in (out / "audit.json").read_text()


def test_a_probe_without_the_probe_keywords_is_refused_when_registered(monkeypatch):
    from patchlab.probes import Probe, register_probe

    monkeypatch.setattr(PROBES, "_entries", dict(PROBES.items()))

    def old_run(pair, questions, *, unrelated, retain, settings, progress):
        raise AssertionError("never called")

    with pytest.raises(patchlab.PatchlabValueError, match="probe 'old_probe': run must take .*it lacks baselines"):
        register_probe(Probe(name="old_probe", title="Old", run=old_run, defaults={}))
    assert "old_probe" not in PROBES
    register_probe(Probe(name="any_keywords", title="Any", run=lambda pair, questions, **kwargs: None, defaults={}))
    assert "any_keywords" in PROBES


def test_plugin_scorer_reaches_wagle_density(plugin, checkpoint, tmp_path, capsys):
    cli = load_script("wagle_density")
    args = cli.parse_args(["--methods", "plugin_ones,magnitude"])
    with pytest.raises(patchlab.PatchlabValueError, match="--methods must name some of"):
        cli.plan(args)  # not loaded yet
    from patchlab.cli import load_plugins

    load_plugins(["--plugin", str(plugin)])
    assert cli.plan(args)[0] == ["plugin_ones", "magnitude"]


@pytest.mark.parametrize("bad, match", [
    ("no_such_plugin_module", "--plugin no_such_plugin_module: cannot import it"),
    ("missing_file.py", "--plugin missing_file.py: no such file"),
])
def test_a_bad_plugin_is_one_error_line(bad, match, capsys):
    assert load_script("krs_sweep").main(["--plugin", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_probe_setting_sets_any_probe_option_and_refuses_bad_ones(capsys):
    cli = load_script("audit")
    args = cli.parse_args(["--probe-setting", "uds.threshold=0.1", "--probe-setting", "krs.positions=middle",
                           "--probe-setting", "quantization.bits=[8,4]", "--window", "3"])
    assert cli.settings_from_args(args, toy=False) == {
        "uds": {"threshold": 0.1}, "krs": {"positions": "middle", "window": 3}, "quantization": {"bits": [8, 4]}}
    for argv, message in ((["--probe-setting", "uds.nope=1"], "unknown uds option(s) ['nope']"),
                          (["--probe-setting", "nope.x=1"], "unknown settings section 'nope'"),
                          (["--probe-setting", "krs.window=4", "--window", "3"],
                           "--probe-setting krs.window repeats an option its own flag sets")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--probe-setting", "threshold"])
    assert "expected SECTION.OPTION=VALUE" in capsys.readouterr().err
