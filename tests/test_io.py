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
from patchlab.io import LOCK, MANIFEST, OutputDir, output_dir, read_manifest
from tests.conftest import load_script


def _files(**files: str):
    """A ``write`` callback for :meth:`OutputDir.write_tree` creating ``files`` (name: text)."""
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def _listing(path: Path) -> list[tuple[str, str]]:
    return sorted((p.name, p.read_text()) for p in path.iterdir() if p.name not in (MANIFEST, LOCK))


def test_new_directory_is_written_with_a_manifest_and_no_leftovers(tmp_path):
    out = OutputDir(tmp_path / "parent" / "ckpt", "checkpoint")
    out.write_tree(_files(a="1", b="2"))
    out.close()  # releases the lock: its file goes
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
    first.write("partial.json", lambda path: path.write_text("{}"))
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


# ------------------------------------------------------------------------------------ untrusted manifests

def _forge(out: Path, files, pending=None) -> None:
    """Make ``out`` a patchlab 'krs' output whose manifest lists ``files``."""
    out.mkdir(exist_ok=True)
    (out / "krs.json").write_text("{}")
    manifest = {"format": "patchlab.output/1", "kind": "krs", "key": None, "complete": True, "files": files}
    if pending is not None:
        manifest["pending"] = pending
    (out / MANIFEST).write_text(json.dumps(manifest))


def _escape(tmp_path: Path, form: str):
    """A manifest entry of escape ``form``; everything outside ``tmp_path / 'out'`` must survive."""
    out, thesis = tmp_path / "out", tmp_path / "thesis.tex"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("notes")
    if form == "link_to_outside":
        (out / "link").symlink_to(thesis)
    if form == "dir_link":
        (out / "sub").symlink_to(tmp_path / "elsewhere")
    if form == "directory":
        (out / "subdir").mkdir()
        (out / "subdir" / "keep.txt").write_text("k")
    if form == "fifo":
        os.mkfifo(out / "pipe")
    return {"parent": "../thesis.tex", "absolute": str(thesis), "nested_parent": "sub/../../thesis.tex",
            "dot": "./krs.json", "link_to_outside": "link", "dir_link": "sub/notes.txt", "directory": "subdir",
            "fifo": "pipe", "manifest": MANIFEST, "empty": "", "number": 7, "nul": "a\x00b"}[form]


ESCAPES = ["parent", "absolute", "nested_parent", "dot", "link_to_outside", "dir_link", "directory", "fifo",
           "manifest", "empty", "number", "nul"]


@pytest.mark.parametrize("field", ["files", "pending"])
@pytest.mark.parametrize("form", ESCAPES)
def test_a_manifest_entry_escaping_the_directory_is_refused_and_nothing_is_removed(tmp_path, form, field):
    (tmp_path / "thesis.tex").write_text("years")
    entry = _escape(tmp_path, form)
    out = tmp_path / "out"
    if field == "files":
        _forge(out, ["krs.json", entry])
    else:
        _forge(out, ["krs.json"], pending=[entry])
    before = sorted((p.relative_to(tmp_path).as_posix(), p.is_file() and p.read_text()) for p in tmp_path.rglob("*")
                    if not p.is_fifo())
    for kwargs in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(patchlab.PatchlabFileError, match="cannot be trusted"):
            OutputDir(out, "krs", **kwargs)
    after = sorted((p.relative_to(tmp_path).as_posix(), p.is_file() and p.read_text()) for p in tmp_path.rglob("*")
                   if not p.is_fifo())
    assert after == before  # not even the directory's own krs.json was removed


@pytest.mark.parametrize("files", ["thesis.tex", {"a": 1}, None])
def test_a_manifest_whose_file_list_is_not_a_list_is_refused(tmp_path, files):
    _forge(tmp_path / "out", files)
    with pytest.raises(patchlab.PatchlabFileError, match="not a list"):
        OutputDir(tmp_path / "out", "krs", overwrite=True)
    assert (tmp_path / "out" / "krs.json").read_text() == "{}"


@pytest.mark.parametrize("script", ["param_cosine", "krs_sweep"])
def test_scripts_given_a_forged_manifest_refuse_it_and_touch_nothing(tmp_path, capsys, script):
    (tmp_path / "thesis.tex").write_text("years")
    _forge(tmp_path / "out", ["krs.json", "../thesis.tex", str(tmp_path / "thesis.tex")])
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    manifest["kind"] = {"param_cosine": "paramdiff", "krs_sweep": "krs"}[script]
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(manifest))
    code = load_script(script).main(["--out", str(tmp_path / "out"), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "cannot be trusted" in err, err
    assert (tmp_path / "thesis.tex").read_text() == "years" and (tmp_path / "out" / "krs.json").is_file()
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == manifest  # not rewritten


def test_an_entry_swapped_for_a_symlink_after_the_claim_is_not_followed(tmp_path):
    (tmp_path / "thesis.tex").write_text("years")
    out = tmp_path / "out"
    OutputDir(out, "krs").write("old.json", lambda path: path.write_text("{}"))
    claim = OutputDir(out, "krs", overwrite=True)
    (out / "old.json").unlink()
    (out / "old.json").symlink_to(tmp_path / "thesis.tex")  # swapped in between the claim and the first write
    claim.write("new.json", lambda path: path.write_text("{}"))
    assert (tmp_path / "thesis.tex").read_text() == "years"
    assert read_manifest(out)["files"] == ["new.json"]


@pytest.mark.parametrize("name", ["../x.json", "/tmp/x.json", "a/../../x.json", ""])
def test_result_file_names_must_stay_inside(tmp_path, name):
    with pytest.raises(patchlab.PatchlabValueError, match="inside the directory"):
        OutputDir(tmp_path / "out", "krs").write(name, lambda path: path.write_text("{}"))
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------- claims: symlinks, locks, disk full

def test_a_dangling_symlink_out_fails_at_the_claim(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    with pytest.raises(patchlab.PatchlabFileError, match="dangling symlink"):
        OutputDir(tmp_path / "out", "density")
    assert not (tmp_path / "missing").exists()


def test_a_claim_that_writes_nothing_leaves_nothing(tmp_path):
    out = OutputDir(tmp_path / "a" / "b" / "out", "krs")
    assert (out.path / LOCK).read_text() == str(os.getpid())
    out.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(patchlab.PatchlabValueError, match="closed"):
        out.write("x.json", lambda path: path.write_text("{}"))


HOLD = """
import sys, time
from patchlab.io import OutputDir
out = OutputDir(sys.argv[1], "krs")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_first(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1])
    try:
        assert first.stdout.readline().strip() == "held"
        for kwargs in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(patchlab.PatchlabFileError, match=f"in use by another patchlab run \\(process "
                                                                 f"{first.pid}\\)"):
                OutputDir(out, "krs", **kwargs)
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the lock, the stale file stays
        first.wait()
    assert (out / LOCK).is_file()
    OutputDir(out, "krs").write("krs.json", lambda path: path.write_text("{}"))  # no longer held: claimed


def test_claims_in_one_process_share_the_lock(tmp_path):
    first = OutputDir(tmp_path / "out", "krs", resume=True, key="k")
    second = OutputDir(tmp_path / "out", "krs", resume=True, key="k")
    first.close()
    second.write("a.json", lambda path: path.write_text("{}"))
    assert (tmp_path / "out" / LOCK).is_file()  # still held by the second claim
    del second
    assert not (tmp_path / "out" / LOCK).exists()


def test_disk_full_gives_a_clear_error_and_an_exact_manifest(tmp_path):
    import errno

    out = OutputDir(tmp_path / "out", "audit")
    out.write("a.json", lambda path: patchlab.io.atomic_write_json(path, {"a": 1}))

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(patchlab.PatchlabFileError, match="b.json.*the disk is full"):
        out.write("b.json", lambda path: patchlab.io.atomic_write(path, full))
    manifest = read_manifest(out.path)
    assert manifest["files"] == ["a.json"] and manifest["pending"] == [] and manifest["complete"]
    assert sorted(p.name for p in out.path.iterdir()) == [MANIFEST, LOCK, "a.json"]
    with pytest.raises(patchlab.PatchlabFileError, match="c.json.*the disk is full"):
        out.write("c.json", full)  # a writer that is not atomic leaves its half file: listed, as it is there
    assert read_manifest(out.path)["files"] == ["a.json", "c.json"]
    with pytest.raises(patchlab.PatchlabFileError, match="the disk is full"):
        out.write_tree(lambda tmp: full(tmp / "model.safetensors"))
    assert read_manifest(out.path)["files"] == ["a.json", "c.json"]


# ---------------------------------------------------------------------------------------------- reading

def test_jsonl_errors_name_the_file_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a?"}\n{"question": "b?", oops}\n')
    with pytest.raises(patchlab.PatchlabValueError, match=r"q.jsonl, line 2 is not valid JSONL: .*\(column \d+\)"):
        patchlab.io.read_questions(path)
    path.write_bytes(b'\xef\xbb\xbf{"question": "a?"}\n\n{"question": "b?"}\n')
    assert patchlab.io.read_questions(path) == ["a?", "b?"]
    (tmp_path / "q.json").write_bytes(b'\xef\xbb\xbf["a?"]')
    assert patchlab.io.read_questions(tmp_path / "q.json") == ["a?"]
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe[1]")
    with pytest.raises(patchlab.PatchlabValueError, match="not UTF-8"):
        patchlab.io.read_json(tmp_path / "bad.json")


@pytest.mark.parametrize("text, why", [("[" + "9" * 5000 + "]", "Exceeds the limit"), ("[" * 100_000, "too deep")])
def test_json_too_large_to_read_is_a_patchlab_error(tmp_path, text, why):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(patchlab.PatchlabValueError, match=why):
        patchlab.io.read_json(tmp_path / "r.json")


def test_the_ranks_of_one_distributed_job_share_rank_0s_lock(tmp_path, monkeypatch):
    import subprocess
    import sys

    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    out = tmp_path / "out"
    rank0 = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1], env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    try:
        assert rank0.stdout.readline().strip() == "held"
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        OutputDir(out, "krs")  # rank 1 of the same job: no lock of its own, not refused
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(patchlab.PatchlabFileError, match=f"process {rank0.pid}"):
            OutputDir(out, "krs")  # rank 0 of another job
    finally:
        rank0.kill()
        rank0.wait()
