"""The toy world's audit: its cases (one per unlearning method and concept) and settings, for
``python analyses/audit.py`` run without checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patchlab import toy
from patchlab.errors import PatchlabValueError
from patchlab.pair import load_model, load_pair
from patchlab.probes.base import as_questions
from patchlab.probes.run import AuditCase

#: Settings of the toy world's audit (``python analyses/audit.py`` with no checkpoint): the toy models are small
#: and were trained at learning rates near 1e-3, so the relearning attack fine-tunes at that scale too.
TOY_SETTINGS: dict[str, dict[str, Any]] = {"relearning": {"lr": 1e-3}}


def toy_cases(methods: Sequence[str] = ("graddiff",), concepts: Sequence[str] | None = None, *,
              sanity: bool = False, progress: bool = True, questions: Sequence[Any] | None = None,
              unrelated: Sequence[Any] | None = None, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> list[AuditCase]:
    """Audit cases on the toy world: per concept (default :data:`patchlab.toy.DEFAULT_CONCEPT`) one per unlearning
    method (:func:`patchlab.toy.pair`, in ``dtype`` on ``device`` when given), with the concept's 10 QA (answers
    known) and 50 unrelated QA, and the shipped retain model where one exists (the default concept's).

    ``questions`` / ``unrelated`` (the forms of :class:`AuditCase`) replace the concept's target / unrelated QA; they
    are about one concept, so they need exactly one.

    ``sanity`` adds, per concept with a retain model, a case with the retain model in the unlearned model's place:
    a model that never saw the concept, which every probe should call erased.

    Labels: the method (``"retain model"`` for the sanity case), prefixed with the concept when there are several.

    Raises:
        PatchlabValueError: no method, an unknown concept or method, ``questions`` / ``unrelated`` with several
            concepts, or malformed questions.
    """
    concepts = list(concepts or [toy.DEFAULT_CONCEPT])
    if isinstance(methods, str) or not methods:
        raise PatchlabValueError("methods must be a non-empty list of toy unlearning methods")
    if (questions is not None or unrelated is not None) and len(concepts) != 1:
        raise PatchlabValueError(f"given questions are about one concept: audit one toy concept with them, not "
                                 f"{len(concepts)} ({', '.join(concepts)})")
    questions = as_questions(questions, "target") if questions is not None else None
    unrelated = as_questions(unrelated, "unrelated") if unrelated is not None else None
    placement = {"dtype": dtype, "device": device}
    cases = []
    for concept in concepts:
        record = toy.world().record(concept)
        target = questions if questions is not None else record.qa
        others = unrelated if unrelated is not None else record.unrelated_qa
        has_retain = concept == toy.DEFAULT_CONCEPT  # the one concept whose retain model ships
        prefix = f"{concept}: " if len(concepts) > 1 else ""
        for method in methods:
            tp = toy.pair(concept, method, retain=has_retain, progress=progress, **placement)
            sources = {"vanilla": toy.ASSETS, "unlearned": f"toy world: {method} unlearning of {concept} "
                       f"({toy.METHOD_SETTINGS[method]})", "retain": toy.RETAIN_ASSETS}
            cases.append(AuditCase(prefix + method, tp.pair, target, others, tp.retain_model, sources))
        if sanity:
            if not has_retain:
                raise PatchlabValueError(f"no retain model ships for {concept!r}: the sanity case needs one")
            model_v, tok = toy.vanilla()
            cases.append(AuditCase(prefix + "retain model",
                                   load_pair(model_v, toy.retain(concept), tokenizer=tok, **placement),
                                   target, others, load_model(toy.retain(concept), **placement),
                                   {"vanilla": toy.ASSETS, "unlearned": toy.RETAIN_ASSETS,
                                    "retain": toy.RETAIN_ASSETS}))
    return cases
