"""Text-similarity metrics of the behavioural tests (Hong et al., section 4).

* **BLEU**: sacrebleu's ``sentence_bleu`` (13a tokenisation, exponential smoothing, effective order), on sacrebleu's
  0-100 scale (:func:`sentence_bleu`);
* **ROUGE-L**: the LCS-based F-measure (:func:`rouge_l`) of two token sequences, on a 0-1 scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sacrebleu

from patchlab.errors import PatchlabValueError



def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[Any], reference: Sequence[Any], *, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin, 2004) of two token sequences, in 0..1.

    With ``L = LCS(candidate, reference)``, ``P = L / len(candidate)``, ``R = L / len(reference)``:
    ``F = (1 + beta^2) P R / (R + beta^2 P)`` (``beta = 1``: the harmonic mean). Two empty sequences score 1,
    one empty sequence scores 0.
    """
    if beta <= 0:
        raise PatchlabValueError(f"beta must be > 0, got {beta}")
    if not candidate or not reference:
        return float(not candidate and not reference)
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU (default: 13a tokenisation, ``exp`` smoothing, effective order), 0..100.

    Identical strings score 100 (sacrebleu gives 0 for two empty strings).
    """
    if hypothesis.strip() == reference.strip():
        return 100.0
    return min(100.0, sacrebleu.sentence_bleu(hypothesis, [reference]).score)
