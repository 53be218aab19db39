"""Bounded memory: a sweep prepares as many questions together as its memory budget allows and holds the restored
logits of a pass to a part of it; the scores equal those of every question at once."""

from __future__ import annotations

import numpy as np
import pytest

import patchlab
from patchlab.patching import engine, sweep
from patchlab.patching.engine import question_cache_bytes
from patchlab.patching.sweep import memory_bytes, plan_chunks
from tests.conftest import QUESTIONS, prepared

MANY = [f"{q}" for q in QUESTIONS * 4]  # 12 questions


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_question_cache_bytes_counts_the_store_exactly(biased_pairs, family):
    pair = biased_pairs[family]
    sites = ("coef", "attn", "heads", "mlp_out", "resid")
    store = prepared(pair, QUESTIONS, 4, sites=sites)
    held = sum(t.numel() * t.element_size() for t in [*store.source.values(), *store.target_resid.values()])
    held += sum(r.source.numel() * r.source.element_size() + r.target.numel() * r.target.element_size()
                for r in store.refs)
    expected = sum(question_cache_bytes(pair.vanilla_hf, pair.arch, [pair.arch.site(s) for s in sites], len(ids),
                                        n, pair.vanilla_hf.dtype) for ids, n in zip(store.ids, store.answer_lens))
    assert held == expected


def test_chunks_follow_the_budget():
    assert plan_chunks([3, 3, 3, 3], None) == [[0, 1, 2, 3]]
    assert plan_chunks([3, 3, 3, 3], 7) == [[0, 1], [2, 3]]
    assert plan_chunks([3, 9, 3], 7) == [[0], [1], [2]]  # too large alone: a chunk of its own
    assert plan_chunks([1, 1, 1], 100, cap=2) == [[0, 1], [2]]
    assert memory_bytes("2GiB") == 2 ** 31 and memory_bytes("1.5 kb") == 1500 and memory_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", 0, 1.5, True, "GiB"):
        with pytest.raises(patchlab.PatchlabValueError, match="memory_budget must be"):
            memory_bytes(bad)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_a_small_budget_chunks_questions_and_logits_with_the_same_scores(biased_pairs, family, monkeypatch):
    pair = biased_pairs[family]
    kw = dict(components=["coef", "value+attn", "heads[1]", "resid"], window=2, n_tokens=4, progress=False)
    whole = patchlab.patch_sweep(pair, MANY, memory_budget=None, **kw)
    chunks, head_passes = [], []
    prepare_source, head_logits = sweep.prepare_source, engine.head_logits
    monkeypatch.setattr(sweep, "prepare_source", lambda *a, **k: chunks.append(len(a[2])) or prepare_source(*a, **k))
    monkeypatch.setattr(engine, "head_logits", lambda *a, **k: head_passes.append(1) or head_logits(*a, **k))
    default = patchlab.patch_sweep(pair, MANY, **kw)
    assert chunks == [len(MANY)] and not head_passes  # the default 2 GiB holds these tiny questions at once
    few = patchlab.patch_sweep(pair, MANY, memory_budget="150KiB", **kw)  # a few questions per chunk
    assert 1 < len(chunks) - 1 < len(MANY) and sum(chunks[1:]) == len(MANY) and not head_passes
    del chunks[:]
    tiny = patchlab.patch_sweep(pair, MANY, memory_budget="2KiB", **kw)  # one question, one logits row at a time
    assert chunks == [1] * len(MANY) and len(head_passes) > 0
    for result in (default, few, tiny):
        for comp in whole.components:
            np.testing.assert_allclose(result.per_question[comp], whole.per_question[comp], atol=1e-6, rtol=0)


def test_the_sweep_prepares_each_chunk_through_the_same_path_as_prepare(biased_pairs, monkeypatch):
    """patch_sweep and prepare (tests, benchmarks) share one preparation, sweep.prepared: one call per chunk, and
    the store prepare returns is the one the sweep scores."""
    pair = biased_pairs["llama"]
    calls, stores = [], []
    original = sweep.prepared

    def counting(*a, **k):
        calls.append(len(a[1]))
        return original(*a, **k)
    monkeypatch.setattr(sweep, "prepared", counting)
    monkeypatch.setattr(sweep, "run_rows", lambda _m, store, rows, *a, **k: stores.append(store) or
                        engine.run_rows(_m, store, rows, *a, **k))
    result = patchlab.patch_sweep(pair, QUESTIONS, components=["coef"], window=2, n_tokens=4, progress=False,
                                  memory_budget="40KiB")
    assert len(calls) > 1 and sum(calls) == len(QUESTIONS)
    store = prepared(pair, QUESTIONS[-1:], 4, sites=("coef",))
    assert len(calls) == len(stores) + 1  # prepare went through it too
    assert [len(ids) for ids in store.ids] == [len(ids) for ids in stores[-1].ids[-1:]]
    assert result.answers[-1] == pair.tokenizer.decode(store.refs[0].answer_ids.cpu(), skip_special_tokens=True)
