"""Behavioural test (Hong et al., section 4): do the unlearned model's greedy answers still match the vanilla ones?

Runs :func:`patchlab.analysis.behavior.evaluate` on the target and the unrelated questions: per question, sentence
BLEU (0-100) and token ROUGE-L (0-1) of the unlearned answer against the vanilla answer (at most ``n_tokens``), with
bootstrap intervals over questions. A good unlearning method drives the target scores down and keeps the unrelated
ones up. Behaviour only sees the output, so it can never call knowledge hidden.

Headline: the target BLEU. Verdict: ``intact`` if it is >= 50 (the answers mostly unchanged), else ``erased`` (gone
from the output, which says nothing about the weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedModel

from patchlab.analysis.behavior import METRICS, SETS, evaluate
from patchlab.probes.base import Interval, Probe, ProbeResult
from patchlab.probes.bootstrap import mean_interval
from patchlab.probes.scoring import Baselines
from patchlab.pair import ModelPair
from patchlab.pair.qa import QA

DEFAULTS: dict[str, Any] = {}
#: Target BLEU (0-100) at or above which the answers count as unchanged.
INTACT_BLEU = 50.0
RULE = f"intact if the target BLEU is >= {INTACT_BLEU:.0f}; else erased (behaviour cannot see hidden knowledge)"


def run(pair: ModelPair, questions: list[QA], *, unrelated: list[QA] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool, baselines: Baselines
        ) -> ProbeResult:
    """The behaviour probe (module docstring); its BLEU scores compare with the vanilla model's own generations,
    so it leaves ``baselines`` unread."""
    table = evaluate(pair, [q.question for q in questions], [q.question for q in unrelated or []],
                     max_new_tokens=settings["n_tokens"], template=settings["template"], progress=progress).table
    stats = {s: {m: mean_interval(table.loc[table["set"] == s, m].to_numpy(dtype=float), settings).to_list()
                 for m in METRICS} for s in SETS}
    headline = Interval.from_list(stats["target"]["bleu"])
    return ProbeResult(
        probe="behavior", score=headline, verdict="intact" if headline.value >= INTACT_BLEU else "erased", rule=RULE,
        meaning="target BLEU of the unlearned answers against the vanilla ones (0-100; 100 = unchanged)",
        details={"scores": stats, "rows": table.to_dict("records")})


PROBE = Probe(
    name="behavior", title="Behaviour (BLEU / ROUGE-L)", run=run, defaults=DEFAULTS,
    needs=("unrelated",),
    description="The unlearned model's greedy answers are compared with the vanilla model's: sentence BLEU "
                "(0-100) and token ROUGE-L (0-1), on the target questions (should drop) and on unrelated questions "
                "(should stay high). Behaviour only sees the output: it cannot tell erased from hidden. Error bars "
                "are 95% bootstrap intervals over questions.")
