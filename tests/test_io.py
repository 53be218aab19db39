"""Output directories: patchlab never removes a file it did not write, and checks every output location before
any compute; atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import patchlab
import patchlab.pair
import patchlab.toy
from patchlab.io import MANIFEST, OutputDir, output_dir, read_manifest
from tests.conftest import load_script


def _files(**files: str):
    """A ``write`` callback for :meth:`OutputDir.write_tree` creating ``files`` (name: text)."""
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def _listing(path: Path) -> list[tuple[str, str]]:
    return sorted((p.name, p.read_text()) for p in path.iterdir() if p.name != MANIFEST)


def test_new_directory_is_written_with_a_manifest_and_no_leftovers(tmp_path):
    out = OutputDir(tmp_path / "parent" / "ckpt", "checkpoint")
    assert not out.path.exists()  # created on the first write, not by the claim
    out.write_tree(_files(a="1", b="2"))
    assert _listing(out.path) == [("a", "1"), ("b", "2")]
    manifest = read_manifest(out.path)
    assert manifest["kind"] == "checkpoint" and manifest["files"] == ["a", "b"] and manifest["complete"]
    assert sorted(p.name for p in out.path.iterdir()) == [MANIFEST, "a", "b"]  # no temp dir left


def test_foreign_files_are_never_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years")
    for overwrite in (False, True):
        with pytest.raises(patchlab.PatchlabFileError, match="did not write.*thesis.tex"):
            OutputDir(out, "checkpoint", overwrite=overwrite)
    assert _listing(out) == [("thesis.tex", "years")]


def test_earlier_output_is_replaced_only_with_overwrite_and_added_files_are_kept(tmp_path):
    out = tmp_path / "run"
    OutputDir(out, "checkpoint").write_tree(_files(model="old", extra="old-only"))
    (out / "NOTES.txt").write_text("my notes")
    with pytest.raises(patchlab.PatchlabFileError, match="overwrite"):
        OutputDir(out, "checkpoint")
    with pytest.raises(patchlab.PatchlabFileError, match="'checkpoint' output, not a 'krs'"):
        OutputDir(out, "krs", overwrite=True)
    OutputDir(out, "checkpoint", overwrite=True).write_tree(_files(model="new"))
    assert _listing(out) == [("NOTES.txt", "my notes"), ("model", "new")]  # old-only file gone, notes kept
    assert read_manifest(out)["files"] == ["model"]


def test_a_failed_write_changes_nothing(tmp_path):
    out = tmp_path / "ckpt"
    OutputDir(out, "checkpoint").write_tree(_files(a="1"))

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        OutputDir(out, "checkpoint", overwrite=True).write_tree(fail)
    assert _listing(out) == [("a", "1")]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a"]


def test_resume_reuses_only_a_run_with_the_same_key(tmp_path):
    first = OutputDir(tmp_path / "sweep", "krs", resume=True, key="k1")
    first.file("partial.json").write_text("{}")
    again = OutputDir(tmp_path / "sweep", "krs", resume=True, key="k1")
    assert again.resumed and not first.resumed
    with pytest.raises(patchlab.PatchlabFileError, match="other settings"):
        OutputDir(tmp_path / "sweep", "krs", resume=True, key="k2")
    assert output_dir(again, "krs") is again
    with pytest.raises(patchlab.PatchlabValueError, match="claimed for 'krs'"):
        output_dir(again, "checkpoint")


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "cwd", "empty"])
def test_unusable_locations_fail_at_the_claim(tmp_path, monkeypatch, where):
    (tmp_path / "taken").write_text("x")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.csv").write_text("1,2")
    monkeypatch.chdir(tmp_path / "work")
    path = {"file": tmp_path / "taken", "under_file": tmp_path / "taken" / "out", "proc": "/proc/patchlab/out",
            "cwd": ".", "empty": ""}[where]
    error = patchlab.PatchlabValueError if where == "empty" else patchlab.PatchlabFileError
    with pytest.raises(error):
        OutputDir(path, "krs")
    assert (tmp_path / "taken").read_text() == "x" and _listing(tmp_path / "work") == [("data.csv", "1,2")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_fails_at_the_claim(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(patchlab.PatchlabFileError, match="cannot write"):
        OutputDir(ro / "out", "krs")


@pytest.mark.parametrize("script", ["krs_sweep", "param_cosine", "wagle_density", "method_sweep", "unlearn"])
def test_every_script_refuses_a_foreign_directory_before_compute(tmp_path, monkeypatch, capsys, script):
    """Each CLI claims --out first: exit 2 with one error line, no model loaded, and the user's file is untouched.
    (Run in-process; test_cli.py runs every script as ``__main__``.)"""
    def no_compute(*args, **kwargs):
        raise AssertionError(f"{script} loaded a model before claiming --out")

    for module, name in ((patchlab, "load_pair"), (patchlab, "load_model"), (patchlab.pair, "load_model"),
                         (patchlab.toy, "pair"), (patchlab.toy, "vanilla")):
        monkeypatch.setattr(module, name, no_compute)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years")
    extra = ["--model", "nowhere", "--forget", "nowhere.jsonl", "--method", "ga"] if script == "unlearn" else []
    code = load_script(script).main([*extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().startswith("error:") and "did not write" in err
    assert "Traceback" not in err
    assert _listing(out) == [("thesis.tex", "years")]


def test_write_tree_gives_every_file_the_mode_of_a_plain_open(tmp_path):
    """A checkpoint's files all get 0o666 less the umask, as open() gives, even one its writer made 0o600
    (safetensors' model.safetensors was left private while the tokenizer files were 0o644)."""
    def write(tmp):
        os.close(os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tokenizer.json").write_text("{}")

    old = os.umask(0o022)
    try:
        OutputDir(tmp_path / "ckpt", "checkpoint").write_tree(write)
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == modes["tokenizer.json"] == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_atomic_write_json_leaves_no_partial_file(tmp_path):
    path = tmp_path / "r.json"
    patchlab.io.atomic_write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        patchlab.io.atomic_write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_weights_digest_sees_every_weight_and_nothing_else(tmp_path):
    from patchlab.provenance import settings_key, weights_digest
    from patchlab.tiny import tiny_model

    a, b = tiny_model("llama", 50, seed=0), tiny_model("llama", 50, seed=0)
    assert weights_digest(a) == weights_digest(b) == weights_digest(dict(a.state_dict()))
    with __import__("torch").no_grad():
        b.lm_head.weight[3, 5] += 1e-6
    assert weights_digest(a) != weights_digest(b)
    a.save_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "a2")  # the same weights written again: separate files, same digest
    b.save_pretrained(tmp_path / "b")
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "a2") != weights_digest(tmp_path / "b")
    with pytest.raises(patchlab.PatchlabValueError, match="no .safetensors"):
        weights_digest(tmp_path)
    assert settings_key({"x": 1}, "a") == settings_key({"x": 1}, "a") != settings_key({"x": 2}, "a")


def test_written_files_are_readable_like_plain_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = patchlab.io.atomic_write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
