"""One-model-at-a-time pairs (``load_pair(..., sequential=True)``) check what a pair in memory checks, and the
weight digests of their provenance are memoised without ever going stale."""

from __future__ import annotations

import os

import pytest

import patchlab
from patchlab import provenance
from patchlab.tiny import tiny_model, word_tokenizer
from tests.conftest import ATTN_OR_UP, CORPUS, perturbed

#: Seconds by which saved checkpoints are dated back, past the window in which a fresh file is never memoised.
AN_HOUR = 3600


@pytest.fixture
def checkpoints(tok, tmp_path):
    """A tiny GPT-2 pair saved to ``tmp_path/vanilla`` and ``tmp_path/unlearned``, without tokenizers."""
    vanilla = tiny_model("gpt2", len(tok), n_layers=2)
    unlearned = perturbed(vanilla, ATTN_OR_UP)
    for name, model in (("vanilla", vanilla), ("unlearned", unlearned)):
        model.save_pretrained(tmp_path / name)
    return tmp_path / "vanilla", tmp_path / "unlearned", vanilla, unlearned


def date_back(directory, seconds: int) -> None:
    """Set the modification time of every safetensors file in ``directory`` ``seconds`` into the past."""
    for path in directory.glob("*.safetensors"):
        then = path.stat().st_mtime - seconds
        os.utime(path, (then, then))


def test_sequential_pair_refuses_checkpoints_with_different_tokenizers(checkpoints, tok):
    v_dir, u_dir, _, _ = checkpoints
    tok.save_pretrained(v_dir)
    word_tokenizer(CORPUS + ["zebra quokka"]).save_pretrained(u_dir)
    with pytest.raises(patchlab.PairMismatchError) as in_memory:
        patchlab.load_pair(v_dir, u_dir)
    with pytest.raises(patchlab.PairMismatchError) as sequential:
        patchlab.load_pair(v_dir, u_dir, sequential=True)
    assert str(sequential.value) == str(in_memory.value)
    assert "different tokenizers" in str(sequential.value)
    tok.save_pretrained(u_dir)  # the same tokenizer: accepted
    assert patchlab.load_pair(v_dir, u_dir, sequential=True).tokenizer.get_vocab() == tok.get_vocab()


def test_directory_digest_is_memoised_until_the_checkpoint_is_overwritten(checkpoints, monkeypatch):
    v_dir, _, _, unlearned = checkpoints
    hashed = []
    real = provenance.weights_digest
    monkeypatch.setattr(provenance, "weights_digest", lambda source: hashed.append(source) or real(source))
    fresh = provenance.checkpoint_digest(str(v_dir), None)
    assert provenance.checkpoint_digest(str(v_dir), None) == fresh == real(v_dir)
    assert len(hashed) == 2  # just written: never memoised
    date_back(v_dir, AN_HOUR)
    assert [provenance.checkpoint_digest(str(v_dir), None) for _ in range(3)] == [fresh] * 3
    assert len(hashed) == 3  # hashed once, then memoised
    unlearned.save_pretrained(v_dir)  # overwritten in place: same name, inode and size
    date_back(v_dir, AN_HOUR)
    assert provenance.checkpoint_digest(str(v_dir), None) == real(v_dir) != fresh
    assert len(hashed) == 4


def test_checkpoint_records_of_a_model_share_its_memoised_digest(checkpoints, monkeypatch):
    _, _, vanilla, _ = checkpoints
    hashed = []
    real = provenance.weights_digest
    monkeypatch.setattr(provenance, "weights_digest", lambda source: hashed.append(source) or real(source))
    records = [provenance.checkpoint_record("vanilla", vanilla) for _ in range(2)]
    assert records[0] == records[1] == {"source": "vanilla", "weights": real(vanilla)}
    assert len(hashed) == 1
