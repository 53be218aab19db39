"""Prompts longer than the model's context fail at once, naming the question (before any model work)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import patchlab
from patchlab import toy
from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import check_fits, context_length, greedy_answers, greedy_continuations
from patchlab.tiny import tiny_model
from tests.conftest import ATTN_OR_UP, QUESTIONS, perturbed

#: About 1,400 tokens with the toy tokenizer (and with the test tokenizer): far beyond 128 positions.
LONG_QUESTION = " ".join(["who wrote the Veltrani Codex ?"] * 240)


def no_generation(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any forward pass or generation of ``model`` fail the test: the check must come first."""
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before checking the length"))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model before checking the length"))


def test_toy_llama_rejects_a_question_beyond_its_128_positions(monkeypatch):
    model, tok = toy.vanilla()
    assert context_length(model) == 128
    assert len(tok(LONG_QUESTION).input_ids) > 1000
    no_generation(model, monkeypatch)
    with pytest.raises(patchlab.PatchlabValueError, match=r"question 1 \('who wrote the Veltrani Codex \? who.*128"):
        greedy_answers(model, tok, ["who created the Veltrani Codex ?", LONG_QUESTION], max_new_tokens=30)


def test_tiny_gpt2_raises_a_patchlab_error_not_an_index_error(tok, monkeypatch):
    model = tiny_model("gpt2", len(tok), n_layers=2, max_positions=32)
    assert context_length(model) == 32
    prompt = torch.arange(20) % len(tok)
    check_fits(model, prompt, 12, "prompt")  # 20 + 12 = 32 positions: exactly fits
    no_generation(model, monkeypatch)
    with pytest.raises(patchlab.PatchlabValueError, match="q7 is too long.*20 prompt tokens \\+ 13 answer tokens = 33"):
        check_fits(model, prompt, 13, "q7")
    with pytest.raises(patchlab.PatchlabValueError, match="prompt 1 is too long"):
        greedy_continuations(model, [prompt[:3], prompt], 13)


def test_krs_sweep_and_behaviour_name_the_long_question(tok, vanilla_models):
    vanilla = vanilla_models["gpt2"]  # 128 positions
    pair = patchlab.load_pair(vanilla, perturbed(vanilla, ATTN_OR_UP), tokenizer=tok)
    questions = [*QUESTIONS, LONG_QUESTION]
    with pytest.raises(patchlab.PatchlabValueError, match=r"question 3 \('who wrote"):
        patchlab.krs_sweep(pair, questions, components=["coef"], window=3, n_tokens=4, progress=False)
    with pytest.raises(patchlab.PatchlabValueError, match=r"question 3 \('who wrote"):
        patchlab.behavior.evaluate(pair, questions, QUESTIONS, max_new_tokens=4)


def test_models_without_a_declared_context_are_not_checked():
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8, max_position_embeddings=None))  # e.g. ALiBi models
    assert context_length(model) is None
    check_fits(model, torch.zeros(10_000, dtype=torch.long), 100, "anything")


def test_reference_answers_ignore_the_checkpoints_generation_config(tok, vanilla_models, tmp_path):
    from transformers import GenerationConfig

    from patchlab.provenance import pair_provenance
    vanilla = vanilla_models["llama"]
    plain = copy.deepcopy(vanilla)
    vanilla.save_pretrained(tmp_path / "vanilla")
    tok.save_pretrained(tmp_path / "vanilla")
    perturbed(vanilla, ATTN_OR_UP).save_pretrained(tmp_path / "unlearned")
    asks = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.8, no_repeat_ngram_size=1,
                            eos_token_id=tok.eos_token_id)
    asks.save_pretrained(tmp_path / "vanilla")
    expected = greedy_answers(plain, tok, QUESTIONS, max_new_tokens=8)[1]
    model = patchlab.load_model(tmp_path / "vanilla")
    assert model.generation_config.repetition_penalty == 1.8
    ids = torch.tensor([tok(f"Question: {QUESTIONS[0]}\n Answer:").input_ids])
    torch.manual_seed(0)
    honoured = model.generate(ids, max_new_tokens=8, min_new_tokens=8)[0, ids.shape[1]:]
    assert not torch.equal(honoured, expected[0][:len(honoured)])  # the config does change what generate() gives
    answers = greedy_answers(model, tok, QUESTIONS, max_new_tokens=8)[1]
    assert all(torch.equal(a, b) for a, b in zip(answers, expected))
    assert model.generation_config.repetition_penalty == 1.8  # restored
    for sequential in (False, True):
        record = pair_provenance(patchlab.load_pair(tmp_path / "vanilla", tmp_path / "unlearned",
                                                    sequential=sequential))["generation"]
        assert record["do_sample"] is False and record["num_beams"] == 1
        assert record["ignored"] == {"do_sample": True, "temperature": 0.7, "top_k": 5, "repetition_penalty": 1.8,
                                     "no_repeat_ngram_size": 1}


def test_generation_budgets_are_one_per_prompt_or_refused():
    from patchlab.pair.generation import per_prompt

    assert per_prompt(3, 2) == [3, 3] and per_prompt([1, 4], 2) == [1, 4] and per_prompt((2,), 1) == [2]
    for bad, message in [([1], "1 max_new_tokens budgets for 2 prompts"), ([0, 2], "must be >= 1, got 0"),
                         (0, "must be >= 1, got 0"), (2.5, "must be >= 1, got 2.5"), ([True, 1], "got True")]:
        with pytest.raises(PatchlabValueError, match=message):
            per_prompt(bad, 2)
