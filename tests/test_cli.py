"""The shared script helpers of patchlab.cli, checked on every script: whole --help texts, Ctrl-C (one line, exit
130, nothing half-written), quiet mode (transformers' own bars too), output files checked before compute; the toy
build's default output outside the package."""

from __future__ import annotations

import ast
import os
import runpy
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

import patchlab
from patchlab.cli import INTERRUPT_STATUS, interrupt_note, output_file, parser, print_written, quiet, run
from patchlab.io import OutputDir, atomic_write_text
from patchlab.toy.build import ASSETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "analyses").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", [*SCRIPTS, ROOT / "patchlab" / "toy" / "build.py"], ids=lambda p: p.name)
def test_help_shows_the_whole_module_docstring(script, monkeypatch, capsys):
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")), clean=False).strip()
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 0
    assert doc in capsys.readouterr().out  # every line and example, line breaks kept


_HEAVY_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    print(stop.code, sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "tqdm"}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--no-such-flag"]], ids=["help", "argument-error"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_and_argument_errors_answer_before_torch_loads(script, argv):
    """``--help`` and argparse errors come from a fresh interpreter that never imported torch, transformers or tqdm
    (they took 16-19 s when every script imported them first)."""
    run = subprocess.run([sys.executable, "-c", _HEAVY_PROBE, str(script), *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    status, loaded = run.stdout.strip().splitlines()[-1].split(" ", 1)
    assert (status, loaded) == ("0" if argv == ["--help"] else "2", "[]"), run.stderr


def test_import_patchlab_is_light_and_loads_names_on_first_use():
    code = ("import sys, patchlab; light = 'torch' not in sys.modules; "
            "print(light, patchlab.load_pair.__module__, patchlab.toy.__name__, patchlab.PatchlabError.__module__, "
            "sorted(set(patchlab.__all__) - set(dir(patchlab))))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.stdout.split() == ["True", "patchlab.pair.loading", "patchlab.toy", "patchlab.errors", "[]"], run.stderr
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        patchlab.no_such_name


def _wrote_literals(script: Path) -> list[int]:
    """Lines of ``script`` holding a string (or f-string) that starts with ``wrote``."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return sorted({n.lineno for n in strings if n.value.lstrip().startswith("wrote")})


@pytest.mark.parametrize("script", [*SCRIPTS, ROOT / "patchlab" / "toy" / "build.py"], ids=lambda p: p.name)
def test_every_script_says_what_it_wrote_in_one_form(script):
    """No script words its own 'wrote' line: they all print through cli.print_written."""
    assert _wrote_literals(script) == []


def test_print_written_prints_one_absolute_path_per_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    print_written({"a.json": "out/a.json", "b.csv": tmp_path / "out" / "b.csv"})
    print_written(["ckpt"])
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'out' / 'a.json'}",
                                                     f"wrote {tmp_path / 'out' / 'b.csv'}", f"wrote {tmp_path / 'ckpt'}"]


def test_parser_needs_a_docstring():
    with pytest.raises(patchlab.PatchlabValueError, match="docstring"):
        parser(None)
    assert parser("One line.\n\n    an example\n").format_help().endswith("One line.\n\n    an example\n\noptions:\n"
                                                                         "  -h, --help  show this help message and exit\n")


# ---------------------------------------------------------------------------------------------------- Ctrl-C


def _interrupted() -> None:
    raise KeyboardInterrupt


def test_run_turns_ctrl_c_into_one_line_and_status_130(tmp_path, capsys):
    assert run(_interrupted) == INTERRUPT_STATUS == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"interrupted: {patchlab.cli.DEFAULT_INTERRUPT_NOTE}"]
    assert run(_interrupted, on_interrupt="saved x; rerun") == 130
    assert capsys.readouterr().err.strip() == "interrupted: saved x; rerun"


def test_interrupt_note_says_what_was_saved_and_how_to_go_on(tmp_path):
    out = OutputDir(tmp_path / "out", "krs")
    note = interrupt_note(out, extra=lambda: None)
    assert note() == f"nothing was written to {out.path}; run the same command again to start over"
    for name in ("a.csv", "b.csv", "c.csv", "d.csv"):
        out.write(name, lambda path: atomic_write_text(path, "1"))
    assert note() == (f"{out.path} holds an unfinished output (a.csv, b.csv, c.csv and 1 more); run the same command "
                      "with --overwrite to start over")
    resumable = interrupt_note(tmp_path / "out", resumable=True, extra=lambda: "the mask was saved to m")
    OutputDir(tmp_path / "out", "krs", resume=True).write("e.csv", lambda path: atomic_write_text(path, "1"))
    assert resumable().endswith("keeps a.csv, b.csv, c.csv and 2 more (whole files); run the same command again to "
                                "resume; the mask was saved to m")


def test_interrupt_note_before_the_first_file_leaves_an_earlier_output_as_it_was(tmp_path):
    OutputDir(tmp_path / "out", "krs").write("krs.json", lambda path: atomic_write_text(path, "{}"))
    note = interrupt_note(OutputDir(tmp_path / "out", "krs", overwrite=True))  # a rerun, stopped before writing
    assert note() == (f"nothing was written to {tmp_path / 'out'} (the earlier output there is as it was); run the "
                      "same command again to start over")
    assert (tmp_path / "out" / "krs.json").read_text() == "{}"


def _read_until(stream, marker: bytes, timeout: float) -> bytes:
    """Bytes of ``stream`` (a pipe) up to the first occurrence of ``marker``, or all of them after ``timeout``."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_sigint_on_a_toy_world_script_prints_one_line_and_exits_130(tmp_path):
    """Ctrl-C while behavior.py builds the toy world's unlearned model for the first time (a fresh cache): exit
    130, one line naming the output directory, no traceback, and neither a cached model nor a temporary file."""
    env = {**os.environ, "PATCHLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "analyses" / "behavior.py"), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        before = _read_until(proc.stderr, b"| 1/", timeout=180)  # the build's bar made its first step
        assert b"unlearn (graddiff)" in before and b"| 1/" in before, before.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = (before + rest).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: nothing was written to {out}; run the same command again to start over"]
    assert err.rstrip().endswith(lines[0])
    assert not out.exists()
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------------------- quiet


def test_quiet_silences_transformers_bars_and_restores_them(tmp_path, vanilla_models, capsys):
    vanilla_models["gpt2"].save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    with quiet():
        assert not hf_logging.is_progress_bar_enabled()
        patchlab.load_model(tmp_path / "ckpt")
        vanilla_models["gpt2"].save_pretrained(tmp_path / "again")
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    patchlab.load_model(tmp_path / "ckpt")
    assert "Loading weights" in capsys.readouterr().err  # the bar the quiet block removed
    with quiet(False):
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a user's own choice survives a quiet block
    try:
        with quiet():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ output files


def test_output_file_is_checked_before_compute(tmp_path):
    assert output_file(tmp_path / "new" / "m.safetensors") == tmp_path / "new" / "m.safetensors"
    assert not (tmp_path / "new").exists()  # checked, nothing created
    (tmp_path / "m.safetensors").write_text("earlier")
    with pytest.raises(patchlab.PatchlabFileError, match="--overwrite"):
        output_file(tmp_path / "m.safetensors")
    assert output_file(tmp_path / "m.safetensors", overwrite=True).read_text() == "earlier"
    with pytest.raises(patchlab.PatchlabFileError, match="is a directory"):
        output_file(tmp_path)
    with pytest.raises(patchlab.PatchlabFileError, match="is a file"):
        output_file(tmp_path / "m.safetensors" / "under")
    with pytest.raises(patchlab.PatchlabFileError, match="cannot write"):
        output_file("/proc/patchlab/m.safetensors")


# ------------------------------------------------------------------------------------------------- toy build


def test_toy_build_writes_into_the_cache_by_default(tmp_path, monkeypatch, capsys):
    from patchlab.toy import build

    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "cache"))
    shipped = {p.name: p.stat().st_mtime_ns for p in ASSETS.iterdir()}
    assert build.main(["--small", "--steps", "3", "--quiet"]) == 0
    target = tmp_path / "cache" / "toy" / "build"
    assert (target / "model.safetensors").is_file() and f"wrote {target}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ASSETS.iterdir()} == shipped  # the package is untouched
    monkeypatch.delenv("PATCHLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.parse_args([]).out == str(tmp_path / "xdg" / "patchlab" / "toy" / "build")
    assert build.parse_args(["--out", str(ASSETS)]).out == str(ASSETS)  # the shipped assets: only when named
