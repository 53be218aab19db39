"""One answer-correctness rule for every score that counts right answers (the audit's probes, the toy build).

A generated answer is *correct* for an expected answer when, after SQuAD's normalisation (:func:`normalize_answer`:
lower case, punctuation and the articles ``a``/``an``/``the`` removed, whitespace collapsed; Rajpurkar et al., 2016,
``normalize_answer`` of the official evaluation script):

1. the expected answer's words appear as a contiguous run of the generation's words (*containment*): ``"The answer
   is: Paris"`` is correct for ``"Paris"``, ``"Parisian"`` is not (whole words only); or
2. for a sentence answer (at least :data:`SENTENCE_WORDS` normalised words), the generation's ROUGE-L recall
   against it (:func:`rouge_l_recall`: the longest common subsequence of words over the expected answer's length)
   is at least :data:`ROUGE_RECALL` (default 0.7).

Why not the first words (the old rule)? A model that prefixes its answer (``"The answer is: Paris"``, a chat model's
``"Sure! Paris."``) gave the right answer and was counted wrong, and a sentence answer (TOFU's are 15-40 words) is
almost never reproduced word for word from its first word, even by the model that was fine-tuned on it.

Why ROUGE-L recall for sentences? It is what TOFU and open-unlearning report for generated answers (their
``rouge`` metric, ``rougeL_recall``), so a verdict here speaks their unit. Containment alone is too strict for a
sentence (one changed word fails it). The threshold 0.7 is a choice, not a law: a model that never saw an author
still shares the question's own words and common phrasing with the answer (TOFU's retain models reach ROUGE-L
recall around 0.4 on the forget set), and a model that learned the answers reproduces most of them (around 0.9 and
above before unlearning); 0.7 sits between the two. Short answers (under :data:`SENTENCE_WORDS` words) are never
judged by overlap: sharing one word of ``"New York"`` is another city, not half an answer.
"""

from __future__ import annotations

import re
import string

from patchlab.errors import PatchlabValueError

#: Expected answers of at least this many normalised words are sentences: judged by ROUGE-L recall too.
SENTENCE_WORDS = 6
#: The ROUGE-L recall (0-1) at or above which a generated sentence answer counts as correct (module docstring).
ROUGE_RECALL = 0.7

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed
    to single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def rouge_l_recall(expected: str, generated: str) -> float:
    """ROUGE-L recall (0-1) of ``generated`` against ``expected`` on normalised words: the length of their longest
    common subsequence over the number of expected words (0 when ``expected`` normalises to nothing)."""
    ref, hyp = normalize_answer(expected).split(), normalize_answer(generated).split()
    if not ref:
        return 0.0
    row = [0] * (len(hyp) + 1)  # one row of the LCS table, updated in place
    for word in ref:
        diagonal = 0
        for j, other in enumerate(hyp, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if word == other else max(row[j], row[j - 1])
    return row[-1] / len(ref)


def answer_correct(generated: str, expected: str, *, rouge_recall: float = ROUGE_RECALL) -> bool:
    """Whether ``generated`` gives ``expected`` (module docstring): the normalised expected words appear as a run of
    the normalised generated words, or, for a sentence answer (>= :data:`SENTENCE_WORDS` words), ROUGE-L recall
    >= ``rouge_recall``.

    An expected answer that normalises to nothing (only punctuation or articles, e.g. a tiny model's ``": :"``)
    is matched on its lower-cased whitespace-separated tokens instead, punctuation kept.

    Raises:
        PatchlabValueError: ``expected`` is blank, or ``rouge_recall`` is not in (0, 1].
    """
    if not 0 < rouge_recall <= 1:
        raise PatchlabValueError(f"rouge_recall must be in (0, 1], got {rouge_recall!r}")
    if not expected.split():
        raise PatchlabValueError(f"the expected answer {expected!r} is blank")
    want, have = normalize_answer(expected), normalize_answer(generated)
    if not want:
        want, have = " ".join(expected.lower().split()), " ".join(generated.lower().split())
    if f" {want} " in f" {have} ":
        return True
    return len(want.split()) >= SENTENCE_WORDS and rouge_l_recall(expected, generated) >= rouge_recall
