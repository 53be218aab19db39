"""The toy world's audit: its cases (one per unlearning method and concept) and settings, for
``python analyses/audit.py`` run without checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchlab import toy
from patchlab.errors import PatchlabValueError
from patchlab.pair import load_pair
from patchlab.probes.run import AuditCase

#: Settings of the toy world's audit (``python analyses/audit.py`` with no checkpoint): the toy models are small
#: and were trained at learning rates near 1e-3, so the relearning attack fine-tunes at that scale too.
TOY_SETTINGS: dict[str, dict[str, Any]] = {"relearning": {"lr": 1e-3}}


def toy_cases(methods: Sequence[str] = ("graddiff",), concepts: Sequence[str] | None = None, *,
              sanity: bool = False, progress: bool = True) -> list[AuditCase]:
    """Audit cases on the toy world: per concept (default :data:`patchlab.toy.DEFAULT_CONCEPT`) one per unlearning
    method (:func:`patchlab.toy.pair`), with the concept's 10 QA (answers known) and 50 unrelated QA, and the shipped
    retain model where one exists (the default concept's).

    ``sanity`` adds, per concept with a retain model, a case with the retain model in the unlearned model's place:
    a model that never saw the concept, which every probe should call erased.

    Labels: the method (``"retain model"`` for the sanity case), prefixed with the concept when there are several.
    """
    concepts = list(concepts or [toy.DEFAULT_CONCEPT])
    if isinstance(methods, str) or not methods:
        raise PatchlabValueError("methods must be a non-empty list of toy unlearning methods")
    cases = []
    for concept in concepts:
        record = toy.world().record(concept)
        has_retain = concept == toy.DEFAULT_CONCEPT  # the one concept whose retain model ships
        prefix = f"{concept}: " if len(concepts) > 1 else ""
        for method in methods:
            tp = toy.pair(concept, method, retain=has_retain, progress=progress)
            sources = {"vanilla": toy.ASSETS, "unlearned": f"toy world: {method} unlearning of {concept} "
                       f"({toy.METHOD_SETTINGS[method]})", "retain": toy.RETAIN_ASSETS}
            cases.append(AuditCase(prefix + method, tp.pair, record.qa, record.unrelated_qa, tp.retain_model,
                                   sources))
        if sanity:
            if not has_retain:
                raise PatchlabValueError(f"no retain model ships for {concept!r}: the sanity case needs one")
            model_v, tok = toy.vanilla()
            cases.append(AuditCase(prefix + "retain model", load_pair(model_v, toy.retain(concept), tokenizer=tok),
                                   record.qa, record.unrelated_qa, toy.retain(concept),
                                   {"vanilla": toy.ASSETS, "unlearned": toy.RETAIN_ASSETS,
                                    "retain": toy.RETAIN_ASSETS}))
    return cases
