"""Questions with their expected answers, and greedy QA scoring: does a model's greedy answer give the expected
answer (:mod:`patchlab.pair.correctness`)?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.correctness import answer_correct
from patchlab.pair.generation import DEFAULT_TEMPLATE, format_prompts, greedy_answers


@dataclass(frozen=True)
class QA:
    """A question and, when known, its expected answer (a short answer or a sentence).

    ``answer=None``: not known. The audit (:mod:`patchlab.probes`) then takes the vanilla model's greedy answer as
    the reference; scoring (:func:`answers_correct`) and training text (:func:`qa_text`) need a given answer.
    """

    question: str
    answer: str | None = None


def check_answers(qa: Sequence[QA], what: str, hint: str = "give every question its answer") -> None:
    """Raise when any of ``qa`` lacks its answer, which ``what`` needs.

    Raises:
        PatchlabValueError: naming ``what``, the indices of the questions without an answer, then ``hint``.
    """
    missing = [i for i, q in enumerate(qa) if q.answer is None]
    if missing:
        raise PatchlabValueError(f"{what} needs the expected answers, but questions {missing} have none; {hint}")


#: Tokens generated beyond the expected answer's length, so that an answer after a preamble (``"The answer is:
#: Paris"``, ``"Sure! Paris."``, an instruct model's ``"The Notre-Dame Cathedral is located in Paris"``, where
#: "Paris" is SmolLM2's 10th token) is still seen.
PREAMBLE_TOKENS = 16


def qa_text(qa: QA, template: str = DEFAULT_TEMPLATE) -> str:
    """A QA pair as training text: the prompt, a space, the answer (the caller appends EOS).

    Raises:
        PatchlabValueError: ``qa`` has no answer.
    """
    check_answers([qa], "qa_text")
    return f"{format_prompts([qa.question], template)[0]} {qa.answer}"


def correctness_budgets(tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA]) -> list[int]:
    """Per question, the tokens :func:`answers_correct` generates: its expected answer's length in tokens plus
    :data:`PREAMBLE_TOKENS`.

    Raises:
        PatchlabValueError: a question without its answer.
    """
    check_answers(qa, "answers_correct")
    return [len(tokenizer(q.answer).input_ids) + PREAMBLE_TOKENS for q in qa]


def answers_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], *,
                    template: str = DEFAULT_TEMPLATE, progress: bool = False) -> list[bool]:
    """For each pair, whether the greedy answer gives the expected answer (:func:`patchlab.pair.correctness.
    answer_correct`: the normalised answer contained in the normalised generation, or ROUGE-L recall >= 0.7 for a
    sentence answer).

    Each question's generation is its own expected answer's length in tokens plus :data:`PREAMBLE_TOKENS` (room for
    a preamble such as ``"The answer is:"``), stopping at EOS, so a question's verdict does not depend on the other
    questions asked with it.

    Raises:
        PatchlabValueError: no pair, or a pair without its answer.
    """
    if len(qa) == 0:
        raise PatchlabValueError("answers_correct: no QA pair given")
    _, generated = greedy_answers(model, tokenizer, [q.question for q in qa],
                                  max_new_tokens=correctness_budgets(tokenizer, qa),
                                  template=template, progress=progress)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return [answer_correct(text, q.answer) for text, q in zip(texts, qa)]


def qa_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], **kwargs) -> float:
    """Fraction (0..1) of ``qa`` answered correctly with greedy decoding (see :func:`answers_correct`)."""
    correct = answers_correct(model, tokenizer, qa, **kwargs)
    return sum(correct) / len(correct)
