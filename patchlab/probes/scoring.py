"""How much of the target knowledge a model shows: greedy answer accuracy and teacher-forced answer log-probability,
and the *recovery* of both after an attack.

References come from the vanilla model: per question, its greedy answer ids (at most ``n_tokens``, EOS kept) and
the expected answer (the given one, else the vanilla greedy answer decoded). For a model,

* ``correct``: its greedy answer gives the expected answer (:func:`patchlab.pair.qa.answers_correct`, the one rule of
  :mod:`patchlab.pair.correctness`: normalised containment, ROUGE-L recall for sentence answers);
* ``logprob``: the mean log-probability per token (nats) of the vanilla answer ids, teacher-forced after the prompt.

An attack's recovery of a score is ``(after - unlearned) / (vanilla - unlearned)`` of its question means: 0 = the
attack brought nothing back, 1 = back to the vanilla model.

Every probe starts from the same references and vanilla / unlearned scores (:func:`baseline_scores`), which it
asks of the :class:`Baselines` it is given: the audit runner creates one per audited case, so they are computed
once per case and shared by its probes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.probes.base import Interval
from patchlab.probes.bootstrap import ratio_of_gains
from patchlab.errors import PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.pair.generation import greedy_answers
from patchlab.pair.qa import QA, answers_correct

SCORES = ("accuracy", "logprob")


@dataclass(frozen=True)
class AnswerReferences:
    """The vanilla model's reference answers to the audited questions.

    Attributes:
        questions: the questions. prompt_ids: their prompt ids (1-D each).
        answer_ids: the vanilla greedy answer ids (1-D each, EOS kept), teacher-forced by
            :func:`teacher_forced_logprob`.
        expected: the expected answer texts (given, else the decoded vanilla answers), matched by
            :func:`answer_correct`.
    """

    questions: list[str]
    prompt_ids: list[Int[torch.Tensor, "prompt"]]
    answer_ids: list[Int[torch.Tensor, "answer"]]
    expected: list[str]

    def qa(self) -> list[QA]:
        return [QA(q, a) for q, a in zip(self.questions, self.expected)]

    def records(self) -> list[dict[str, str]]:
        """``{"question", "answer"}`` records (the expected answers), the fine-tuning data of an attack."""
        return [{"question": q, "answer": a} for q, a in zip(self.questions, self.expected)]


def references(vanilla: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[QA],
               settings: Mapping[str, Any], *, progress: bool = False) -> AnswerReferences:
    """The vanilla model's greedy answers (``settings["n_tokens"]`` at most, ``settings["template"]``) and the
    expected answers of ``questions``.

    Raises:
        PatchlabValueError: a question without a given answer whose vanilla greedy answer holds no word.
    """
    texts = [q.question for q in questions]
    prompt_ids, answers = greedy_answers(vanilla, tokenizer, texts, max_new_tokens=settings["n_tokens"],
                                         template=settings["template"], progress=progress)
    expected = []
    for i, (q, ids) in enumerate(zip(questions, answers)):
        text = q.answer if q.answer is not None else tokenizer.decode(ids, skip_special_tokens=True).strip()
        if not text.split():
            raise PatchlabValueError(f"question {i} ({q.question!r}): the vanilla model's greedy answer is empty; "
                                     "give the expected answers")
        expected.append(text)
    return AnswerReferences(texts, list(prompt_ids), list(answers), expected)


@torch.no_grad()
def teacher_forced_logprob(model: PreTrainedModel, refs: AnswerReferences) -> Float[np.ndarray, "question"]:
    """Per question, the mean log-probability per token (nats, float32) of the vanilla answer ids, teacher-forced
    after the prompt (one unpadded forward pass per question)."""
    device = next(model.parameters()).device
    out = []
    for prompt, answer in zip(refs.prompt_ids, refs.answer_ids):
        ids = torch.cat([prompt, answer]).to(device)
        logits = model(input_ids=ids[None]).logits[0, len(prompt) - 1:-1].float()
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, ids[len(prompt):, None]).mean().item())
    return np.array(out)


@dataclass(frozen=True)
class Scores:
    """Per-question scores of one model: ``correct`` (1.0 / 0.0) and ``logprob`` (nats per answer token)."""

    correct: Float[np.ndarray, "question"]
    logprob: Float[np.ndarray, "question"]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def get(self, name: str) -> Float[np.ndarray, "question"]:
        """The per-question values of ``"accuracy"`` (correctness) or ``"logprob"``."""
        return self.correct if name == "accuracy" else self.logprob

    def to_dict(self) -> dict[str, list[float]]:
        return {"correct": self.correct.tolist(), "logprob": self.logprob.tolist()}

    @classmethod
    def merge(cls, parts: Sequence[tuple[Sequence[int], Scores]], n: int) -> Scores:
        """Scores of ``n`` questions assembled from parts scored on disjoint index subsets."""
        correct, logprob = np.full(n, np.nan), np.full(n, np.nan)
        for idx, part in parts:
            correct[list(idx)], logprob[list(idx)] = part.correct, part.logprob
        if np.isnan(correct).any():
            raise PatchlabValueError("the parts do not cover every question")
        return cls(correct, logprob)


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, refs: AnswerReferences,
          settings: Mapping[str, Any]) -> Scores:
    """Greedy correctness and teacher-forced answer log-probability of ``model`` on every reference question."""
    correct = answers_correct(model, tokenizer, refs.qa(), template=settings["template"])
    return Scores(np.array(correct, dtype=float), teacher_forced_logprob(model, refs))


def subset(refs: AnswerReferences, idx: Sequence[int]) -> AnswerReferences:
    """The references of the questions at ``idx``."""
    return AnswerReferences(*([field[i] for i in idx] for field in (refs.questions, refs.prompt_ids, refs.answer_ids,
                                                              refs.expected)))


def recovery(after: Scores, unlearned: Scores, vanilla: Scores, settings: Mapping[str, Any]) -> dict[str, Interval]:
    """``{"accuracy": ..., "logprob": ...}``: the share of the vanilla-minus-unlearned gap of each score's question
    mean that ``after`` closes, with its bootstrap interval over questions (NaN where the gap is zero)."""
    return {name: ratio_of_gains(after.get(name), unlearned.get(name), vanilla.get(name), settings)
            for name in SCORES}


def baseline(vanilla: Scores, unlearned: Scores) -> dict[str, Any]:
    """The vanilla and unlearned models' per-question scores and accuracies, as stored in every probe's details."""
    return {"vanilla": {**vanilla.to_dict(), "accuracy": vanilla.accuracy},
            "unlearned": {**unlearned.to_dict(), "accuracy": unlearned.accuracy}}


def baseline_scores(pair: ModelPair, questions: Sequence[QA], settings: Mapping[str, Any],
                    progress: bool = False) -> tuple[AnswerReferences, Scores, Scores]:
    """(references, vanilla scores, unlearned scores) of ``questions`` on ``pair``: :func:`references`, then
    :func:`score` of both models, computed afresh (probes ask :meth:`Baselines.get`, which computes them once)."""
    refs = references(pair.vanilla_hf, pair.tokenizer, questions, settings, progress=progress)
    vanilla, unlearned = (score(m, pair.tokenizer, refs, settings) for m in (pair.vanilla_hf, pair.unlearned_hf))
    return refs, vanilla, unlearned


#: The key of one baseline: the pair's identity, the questions, ``n_tokens`` and ``template``.
BaselineKey = tuple[int, tuple[QA, ...], int, str]


class Baselines:
    """The baselines (:func:`baseline_scores`) of one audited case, each computed on its first request and handed
    to every later one: the audit runner creates one per case and passes it to each probe (``baselines=``), so the
    probes of a case share their reference answers and vanilla / unlearned scores, and nothing outlives the case.
    A direct ``probe.run`` call passes a fresh ``Baselines()``.

    One is keyed by (pair, questions, ``n_tokens``, ``template``); it holds its pair, so the pair's identity stays
    unique while it is kept.
    """

    def __init__(self) -> None:
        self._memo: dict[BaselineKey, tuple[ModelPair, tuple[AnswerReferences, Scores, Scores]]] = {}

    def get(self, pair: ModelPair, questions: Sequence[QA], settings: Mapping[str, Any], progress: bool = False
            ) -> tuple[AnswerReferences, Scores, Scores]:
        """(references, vanilla scores, unlearned scores) of ``questions`` on ``pair`` with ``settings["n_tokens"]``
        and ``settings["template"]``, computed on the first request. The results are shared: read them, never
        modify them."""
        key = (id(pair), tuple(questions), settings["n_tokens"], settings["template"])
        if key not in self._memo:
            self._memo[key] = (pair, baseline_scores(pair, questions, settings, progress))
        return self._memo[key][1]
