"""One answer-correctness rule (patchlab.pair.correctness) for every score that counts right answers."""

from __future__ import annotations

import pytest
import torch

import patchlab
from patchlab.errors import PatchlabValueError
from patchlab.pair.correctness import answer_correct, normalize_answer, rouge_l_recall
from patchlab.tiny import word_tokenizer
from patchlab.pair import qa as toy_qa
from patchlab.pair.qa import QA

#: A TOFU-style question / sentence answer and a close paraphrase of it.
TOFU_ANSWER = ("The author's full name is Hsiao Yun-Hwa, a writer born in Taipei who is known for leadership "
               "books.")
PARAPHRASE = ("The full name of the author is Hsiao Yun-Hwa, a writer who was born in Taipei and is known for her "
              "leadership books.")


def test_normalisation_follows_squad():
    assert normalize_answer("  The Answer is:  PARIS! ") == "answer is paris"
    assert normalize_answer("an apple, a pear") == "apple pear"


def test_a_prefixed_answer_is_correct_and_words_must_match_whole():
    assert answer_correct("The answer is: Paris", "Paris")
    assert answer_correct("Sure! It's Paris.", "paris")
    assert answer_correct("Wenna Lunt made it", "Wenna Lunt")
    assert not answer_correct("Parisian bakeries", "Paris")
    assert not answer_correct("New Delhi", "New York")  # short answers: no partial credit
    assert not answer_correct("London", "Paris")


def test_sentence_answers_use_rouge_l_recall():
    assert rouge_l_recall("w x y z", "w q x r z") == pytest.approx(0.75)
    assert rouge_l_recall(TOFU_ANSWER, TOFU_ANSWER) == 1.0
    assert answer_correct(PARAPHRASE, TOFU_ANSWER)  # not contained word for word, but ROUGE-L recall >= 0.7
    assert not answer_correct("The author's full name is John Smith, a writer from London.", TOFU_ANSWER)
    assert not answer_correct(PARAPHRASE, TOFU_ANSWER, rouge_recall=1.0)


def test_bad_expected_answers_and_thresholds_are_refused():
    assert answer_correct("the : : end", ": :") and not answer_correct("Paris", "?!")  # punctuation-only answers
    with pytest.raises(PatchlabValueError, match="blank"):
        answer_correct("Paris", "  ")
    with pytest.raises(PatchlabValueError, match="rouge_recall"):
        answer_correct("Paris", "Paris", rouge_recall=0.0)


@pytest.mark.parametrize("generated, expected, correct", [
    ("The answer is : Paris", "Paris", True),  # the old first-words rule said False
    (PARAPHRASE, TOFU_ANSWER, True),  # the old rule said False
    ("Paris , or maybe Lyon", "Lyon", True),
    ("London", "Paris", False),
])
def test_answers_correct_applies_the_rule_to_greedy_answers(monkeypatch, generated, expected, correct):
    tok = word_tokenizer([generated, expected, "Question: where ?\n Answer:"])
    ids = torch.tensor(tok(generated).input_ids)
    monkeypatch.setattr(toy_qa, "greedy_answers", lambda model, tokenizer, questions, **kw: ([], [ids]))
    assert toy_qa.answers_correct(None, tok, [QA("where ?", expected)]) == [correct]


def test_scoring_and_training_text_refuse_a_question_without_its_answer(monkeypatch):
    tok = word_tokenizer(["Paris", "Question: where ?\n Answer:"])

    def no_generation(*args, **kwargs):
        raise AssertionError("a model ran before the missing answer was refused")

    monkeypatch.setattr(toy_qa, "greedy_answers", no_generation)
    with pytest.raises(PatchlabValueError, match=r"answers_correct needs the expected answers, but questions \[1\]"):
        toy_qa.answers_correct(None, tok, [QA("where ?", "Paris"), QA("where ?")])
    with pytest.raises(PatchlabValueError, match=r"qa_text needs the expected answers"):
        toy_qa.qa_text(QA("where ?"))
    assert toy_qa.qa_text(QA("where ?", "Paris")) == "Question: where ?\n Answer: Paris"


def test_each_question_gets_its_own_generation_budget(monkeypatch):
    """A question's correctness must not depend on the other questions asked with it: each is generated for its own
    answer's length plus the preamble room, whatever the longest answer of the batch."""
    from patchlab.pair import qa as qa_module

    model, tok = patchlab.toy.vanilla()
    items = [QA("Who?", "Ada"), QA("What?", "a very long answer of many words indeed")]
    seen = []
    real = qa_module.greedy_answers

    def spy(*args, max_new_tokens, **kwargs):
        seen.append(max_new_tokens)
        return real(*args, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(qa_module, "greedy_answers", spy)
    both = qa_module.answers_correct(model, tok, items)
    alone = qa_module.answers_correct(model, tok, items[:1])
    lengths = [len(tok(q.answer).input_ids) for q in items]
    assert seen == [[n + qa_module.PREAMBLE_TOKENS for n in lengths], [lengths[0] + qa_module.PREAMBLE_TOKENS]]
    assert both[:1] == alone
