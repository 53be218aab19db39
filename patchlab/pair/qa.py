"""Question-answer pairs and greedy QA scoring: does a model's greedy answer give the expected answer
(:mod:`patchlab.pair.correctness`)?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.correctness import answer_correct
from patchlab.pair.generation import DEFAULT_TEMPLATE, format_prompts, greedy_answers


@dataclass(frozen=True)
class QA:
    """A question and its short answer (1-4 words)."""

    question: str
    answer: str


#: Tokens generated beyond the expected answer's length, so that an answer after a short preamble (``"The answer
#: is: Paris"``, ``"Sure! Paris."``) is still seen.
PREAMBLE_TOKENS = 8


def qa_text(qa: QA, template: str = DEFAULT_TEMPLATE) -> str:
    """A QA pair as training text: the prompt, a space, the answer (the caller appends EOS)."""
    return f"{format_prompts([qa.question], template)[0]} {qa.answer}"


def answers_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], *,
                    template: str = DEFAULT_TEMPLATE, progress: bool = False) -> list[bool]:
    """For each pair, whether the greedy answer gives the expected answer (:func:`patchlab.pair.correctness.
    answer_correct`: the normalised answer contained in the normalised generation, or ROUGE-L recall >= 0.7 for a
    sentence answer).

    The generation is the expected answer's length in tokens plus :data:`PREAMBLE_TOKENS` (room for a preamble such
    as ``"The answer is:"``), stopping at EOS.
    """
    if len(qa) == 0:
        raise PatchlabValueError("answers_correct: no QA pair given")
    longest = max(len(tokenizer(q.answer).input_ids) for q in qa)
    _, generated = greedy_answers(model, tokenizer, [q.question for q in qa], max_new_tokens=longest + PREAMBLE_TOKENS,
                                  template=template, progress=progress)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return [answer_correct(text, q.answer) for text, q in zip(texts, qa)]


def qa_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], **kwargs) -> float:
    """Fraction (0..1) of ``qa`` answered correctly with greedy decoding (see :func:`answers_correct`)."""
    correct = answers_correct(model, tokenizer, qa, **kwargs)
    return sum(correct) / len(correct)
