"""Knowledge Recovery Score (Hong et al., 2024): restore the vanilla model's activations of one component over a
window of layers inside the unlearned model and measure how much of the vanilla answer logits come back.

Runs :func:`patchlab.krs_sweep` (components ``components``, windows of ``window`` layers, the vanilla greedy answers
of :mod:`patchlab.probes.scoring` as references) and adds a bootstrap interval over questions to every (component,
window) mean KRS. ``KRS = 1 - MSE(l_r, l_v) / MSE(l_u, l_v)``: 1 = the restored model's answer logits are the
vanilla model's, 0 = no better than the unlearned model's.

Restoring a *retrieval* component (MLP coefficients, attention outputs, or both; anything but the value vectors)
leaves the unlearned model's own weights to produce the answer: if that brings the vanilla logits back, the
knowledge is still stored and only its retrieval was suppressed. The headline is therefore the best (component,
window) over the retrieval components. Verdict: ``intact`` if the unlearned model keeps >= 50% of the vanilla target
accuracy (also when its logits equal the vanilla ones, where KRS is undefined); else ``hidden`` if the headline KRS
is >= 0.5, else ``erased``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel

from patchlab.probes.base import HIDDEN_SHARE, INTACT_SHARE, Interval, Probe, ProbeResult, recovery_verdict
from patchlab.probes.bootstrap import column_intervals, mean_interval
from patchlab.probes.scoring import Baselines, baseline
from patchlab.errors import DegenerateKRSError, PatchlabValueError
from patchlab.pair import ModelPair
from patchlab.pair.qa import QA
from patchlab.pair.sites import parse_component
from patchlab.patching.result import KRSResult
from patchlab.patching.sweep import DEFAULT_COMPONENTS, POSITIONS, krs_sweep, resolve_components, resolve_windows

DEFAULTS: dict[str, Any] = {"components": list(DEFAULT_COMPONENTS), "window": 5, "window_mode": "centered",
                            "positions": "all"}
RULE = (f"intact if the unlearned model keeps >= {INTACT_SHARE:.0%} of the vanilla target accuracy; else hidden if "
        f"restoring a retrieval component in one window gives KRS >= {HIDDEN_SHARE}; else erased")


def retrieval_components(components: Sequence[str]) -> list[str]:
    """The components that restore no value vectors (their KRS comes from the unlearned model's own weights)."""
    return [c for c in components if "value" not in parse_component(c).sites]


def check(settings: Mapping[str, Any], pair: ModelPair) -> None:
    """The KRS probe's settings against ``pair``, before any compute (:data:`patchlab.probes.base.CheckFn`)."""
    resolve_components(pair, settings["components"])
    resolve_windows(pair, settings["window"], window_mode=settings["window_mode"])
    if settings["positions"] not in POSITIONS:
        raise PatchlabValueError(f"KRS positions must be one of {POSITIONS}, got {settings['positions']!r}")
    if not retrieval_components(settings["components"]):
        raise PatchlabValueError(f"the KRS probe needs a component without 'value' for its headline, got "
                                 f"{settings['components']!r}")


def cell_intervals(result: KRSResult, settings: Mapping[str, Any]) -> dict[str, list[list[float | None]]]:
    """Component -> per window ``[mean KRS, low, high]`` with the bootstrap interval over questions."""
    return {c: column_intervals(values, settings) for c, values in result.per_question.items()}


def run(pair: ModelPair, questions: list[QA], *, unrelated: list[QA] | None,
        retain: PreTrainedModel | None, settings: Mapping[str, Any], progress: bool, baselines: Baselines
        ) -> ProbeResult:
    """The KRS probe (module docstring)."""
    check(settings, pair)
    retrieval = retrieval_components(settings["components"])
    refs, vanilla, unlearned = baselines.get(pair, questions, settings, progress)
    details: dict[str, Any] = baseline(vanilla, unlearned)
    meaning = ("best mean KRS over layer windows when restoring a retrieval component (1 = the vanilla answer "
               "logits come back, 0 = none of them)")
    try:
        result = krs_sweep(pair, refs.questions, components=settings["components"],
                           window=settings["window"], window_mode=settings["window_mode"],
                           n_tokens=settings["n_tokens"], prompt_template=settings["template"],
                           positions=settings["positions"], answers=refs.answer_ids, progress=progress)
    except DegenerateKRSError as err:
        details["degenerate"] = str(err)
        return ProbeResult(probe="krs", score=Interval(math.nan, math.nan, math.nan), meaning=meaning,
                           verdict="intact", rule=RULE, details=details, note="unlearned logits = vanilla logits")
    best_c, best_w = max(((c, w) for c in retrieval for w in range(len(result.windows))),
                         key=lambda cw: result.krs[cw[0]][cw[1]])
    headline = mean_interval(result.per_question[best_c][:, best_w], settings)
    # the shared decision rule; the report keeps KRS's own wording of it (RULE: a KRS threshold, not a share)
    verdict, _, reason = recovery_verdict(headline.value, vanilla.accuracy, unlearned.accuracy,
                                          "restoring a retrieval component")
    start_layer, stop_layer = result.windows[best_w]
    details.update(sweep=result.to_dict(), intervals=cell_intervals(result, settings),
                   window_labels=result.window_labels(),
                   best={"component": best_c, "window": best_w, "layers": [start_layer, stop_layer - 1]})
    return ProbeResult(probe="krs", score=headline, verdict=verdict, rule=RULE, details=details, meaning=meaning,
                       note=f"{best_c}, layers {start_layer}-{stop_layer - 1}", reason=reason)


PROBE = Probe(
    name="krs", title="Knowledge Recovery Score", run=run, defaults=DEFAULTS, check=check,
    description="The vanilla model's activations of one component (MLP coefficients, value vectors, attention "
                "outputs, or coefficients and attention together) are restored inside the unlearned model over a "
                "window of layers, and KRS = 1 - MSE(restored, vanilla) / MSE(unlearned, vanilla) of the answer "
                "logits measures how much of the vanilla answer comes back (1 = all of it). Restoring only the "
                "retrieval (anything but the value vectors) leaves the unlearned model's own weights to produce the "
                "answer: a high KRS there means the knowledge is still stored and only its retrieval was "
                "suppressed. Hover a cell for the layers and the 95% interval over questions.")
