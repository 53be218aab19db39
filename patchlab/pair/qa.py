"""Question-answer pairs and greedy QA scoring: does a model's answer start with the expected words?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, format_prompts, greedy_answers


@dataclass(frozen=True)
class QA:
    """A question and its short answer (1-4 words)."""

    question: str
    answer: str


def qa_text(qa: QA, template: str = DEFAULT_TEMPLATE) -> str:
    """A QA pair as training text: the prompt, a space, the answer (the caller appends EOS)."""
    return f"{format_prompts([qa.question], template)[0]} {qa.answer}"


def answers_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], *,
                    template: str = DEFAULT_TEMPLATE, progress: bool = False) -> list[bool]:
    """For each pair, whether the greedy answer's words start with the expected answer's words."""
    if len(qa) == 0:
        raise PatchlabValueError("answers_correct: no QA pair given")
    longest = max(len(tokenizer(q.answer).input_ids) for q in qa)
    _, generated = greedy_answers(model, tokenizer, [q.question for q in qa], max_new_tokens=longest + 1,
                                  template=template, progress=progress)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).split() for ids in generated]
    return [words[: len(q.answer.split())] == q.answer.split() for words, q in zip(texts, qa)]


def qa_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa: Sequence[QA], **kwargs) -> float:
    """Fraction (0..1) of ``qa`` answered correctly with greedy decoding (see :func:`answers_correct`)."""
    correct = answers_correct(model, tokenizer, qa, **kwargs)
    return sum(correct) / len(correct)
