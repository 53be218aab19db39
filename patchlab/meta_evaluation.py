"""Meta-evaluation of the audit's probes on a zoo (:mod:`patchlab.zoo`): how far can each probe be trusted?

Following open-unlearning (Dorna et al., 2025, Sec. 4) and the UDS paper (gnueaj/unlearning-depth-score,
``scripts/meta_eval_faithfulness.py`` and ``meta_eval_robustness.py``), each probe is scored in two ways.

Every zoo member except the ``full`` model is audited as the unlearned side of a (full, member) pair
(:func:`patchlab.probes.audit_many`, the zoo's retain model given to the probes that need one), and the full model
against itself. A probe's *knowledge reading* :math:`m` of a member (:data:`READINGS`) turns its result into one number
oriented like open-unlearning's metrics: higher = the probe finds more of the target knowledge in the member, 1 = all
of the full model's.

* **Faithfulness**: the AUC-ROC of :math:`m` separating the P pool (``full`` and ``positive`` members: they know the
  target) from the N pool (``negative``: they never saw it), with a percentile bootstrap interval (P and N resampled
  separately). 1 = every P above every N; 0.5 = chance.
* **Robustness**, on the ``unlearned`` members, with the audit's own attacks applied to the member before auditing
  it again: the relearning attack (:func:`finetune` on the target QA, as the relearning probe fine-tunes) and the
  quantization attack (:func:`patchlab.probes.quantization.quantize_`).

  - relearning: per unlearned model :math:`u`,
    :math:`R_u = \\min\\big((m_{ret}^{before} - m_{ret}^{after}) / (m_u^{before} - m_u^{after}),\\ 1\\big)`, the retain
    model relearned in the same way;
  - quantization: :math:`Q_u = \\min(m_u^{after} / m_u^{before},\\ 1)`;
  - :math:`HM = 2 \\bar R \\bar Q / (\\bar R + \\bar Q)` of the means over unlearned models.

  A ratio whose denominator is 0 is undefined (NaN) and left out of the mean; the counts say how many remain.

Each member is one task (:func:`evaluate_member`): in-process by default, or a Ray task (``ray=True``, or
``ray_address`` for a cluster, ``num_gpus`` per task). With ``out_dir`` each finished member is written there
(``models/<name>.json``) before the next is awaited, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import copy
import html
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
import plotly.offline
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.distributed import check_resources, run_tasks
from patchlab.errors import PatchlabValueError
from patchlab.io import atomic_write_json, output_dir, read_json
from patchlab.probes.base import ProbeResult
from patchlab.probes.registry import PROBES, select
from patchlab.probes.run import AuditCase, audit_many, slug
from patchlab.provenance import environment, settings_key
from patchlab.results import Result, register_result
from patchlab.schema import FreeJson, Schema, bad
from patchlab.zoo import NEGATIVE_ROLES, POSITIVE_ROLES, ROLES, Zoo

META_EVAL_FORMAT = "patchlab.MetaEval/1"
#: The format tag of the compact trust file (:meth:`MetaEvalResult.write_trust`, :func:`read_trust`).
TRUST_FORMAT = "patchlab.ProbeTrust/1"

#: The attacks of the robustness scores: relearning (fine-tuning ``steps`` steps on the target QA, AdamW ``lr``,
#: ``batch_size``; answer-token NLL as the relearning probe) and quantization (``bits``, the quantization probe's
#: rounding).
ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {"relearning": {"steps": 20, "lr": 1e-3, "batch_size": 8, "seed": 0},
                                              "quantization": {"bits": 4}}
#: Faithfulness bootstrap: resamples and central interval level.
BOOT = {"n_boot": 1000, "level": 0.95, "seed": 0}
#: The most bootstrap resamples accepted (the resamples are drawn at once: ``n_boot x (|P| + |N|)`` indices).
MAX_BOOT = 100_000
#: Verdicts that say the knowledge is there (a false alarm on a model that never saw the target).
KNOWS = ("hidden", "intact")
#: Audited variants of a member: as it is, and after each attack (unlearned and retain members only).
VARIANTS = ("before", "relearned", "quantized")


# ------------------------------------------------------------------------------------------------ knowledge readings

@dataclass(frozen=True)
class Reading:
    """How a probe's result reads as knowledge: ``read(result) -> m`` (higher = more of the target knowledge found,
    NaN when the probe could not say), and that orientation in words."""

    read: Callable[[ProbeResult], float]
    orientation: str


def revealed_share(result: ProbeResult) -> float:
    """``s + (1 - s) * clip(headline, 0, 1)``: the share of the full model's target accuracy the member shows
    (``s``, clipped to [0, 1]) plus the share of the remaining gap the probe brings back (its headline recovery;
    NaN, as when the gap is 0, counts as 0). 1 = everything the full model knows, 0 = nothing found."""
    d = result.details
    if "vanilla" not in d or "unlearned" not in d:
        raise PatchlabValueError(f"probe {result.probe!r} stores no baseline accuracies; register its own Reading")
    full, member = d["vanilla"]["accuracy"], d["unlearned"]["accuracy"]
    s = min(max(member / full, 0.0), 1.0) if full > 0 else math.nan
    recovered = result.score.value
    recovered = 0.0 if recovered is None or math.isnan(recovered) else min(max(recovered, 0.0), 1.0)
    return s + (1 - s) * recovered


_REVEALED = ("share of the full model's target accuracy the member shows, plus the share of the rest the probe "
             "brings back ({what}); 0-1, higher = knows")

#: Probe name -> its knowledge reading (add one with :func:`register_reading` for a new probe).
READINGS: dict[str, Reading] = {
    "krs": Reading(revealed_share, _REVEALED.format(what="best-window KRS")),
    "logit_lens": Reading(revealed_share, _REVEALED.format(what="logit-lens share")),
    "relearning": Reading(revealed_share, _REVEALED.format(what="held-out relearning recovery")),
    "quantization": Reading(revealed_share, _REVEALED.format(what="quantization recovery")),
    "uds": Reading(lambda r: 1.0 - r.score.value, "1 - UDS (as the UDS paper): 0 = as deep as the retain model, "
                                                  "1 = nothing removed; higher = knows"),
    "behavior": Reading(lambda r: r.score.value / 100.0, "target BLEU / 100 of the member's answers against the full "
                                                         "model's; higher = knows"),
}


def register_reading(probe: str, reading: Reading, *, replace: bool = False) -> Reading:
    """Add the knowledge reading of ``probe`` (a registered probe) to :data:`READINGS`; returns it."""
    if probe not in PROBES:
        raise PatchlabValueError(f"no registered probe {probe!r}; choose from {list(PROBES)}")
    if probe in READINGS and not replace:
        raise PatchlabValueError(f"probe {probe!r} already has a reading; pass replace=True to replace it")
    READINGS[probe] = reading
    return reading


def knowledge(result: ProbeResult) -> float:
    """The knowledge reading of one probe result (:data:`READINGS`); NaN when undefined."""
    if result.probe not in READINGS:
        raise PatchlabValueError(f"probe {result.probe!r} has no knowledge reading; add one with register_reading")
    value = READINGS[result.probe].read(result)
    return math.nan if value is None or not math.isfinite(value) else float(value)


# ------------------------------------------------------------------------------------------------ attacks

def finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, str]], *,
             steps: int, lr: float, batch_size: int, seed: int, template: str | None = None,
             progress: bool = False) -> PreTrainedModel:
    """``model`` fine-tuned in place for ``steps`` steps on ``{"question", "answer"}`` ``records`` exactly as the
    relearning probe fine-tunes (:func:`patchlab.probes.relearning.finetune_curve`: answer-token NLL, AdamW ``lr``
    without weight decay, seeded shuffled batches); returned in eval mode."""
    from patchlab.pair.generation import DEFAULT_TEMPLATE
    from patchlab.probes.relearning import batch_stream, finetune_curve

    if not isinstance(steps, int) or steps < 0:
        raise PatchlabValueError(f"fine-tuning steps must be a non-negative integer, got {steps!r}")
    settings = {"template": template or DEFAULT_TEMPLATE, "batch_size": batch_size, "seed": seed}
    finetune_curve(model, batch_stream(list(records), tokenizer, settings), [steps], lambda m: None, lr=lr,
                   seed=seed, desc="fine-tuning", progress=progress)
    return model.eval()


def attacked(model: PreTrainedModel, variant: str, tokenizer: PreTrainedTokenizerBase,
             records: Sequence[Mapping[str, str]], attacks: Mapping[str, Mapping[str, Any]]) -> PreTrainedModel:
    """A copy of ``model`` after the ``variant`` attack (``"relearned"`` or ``"quantized"``,
    :data:`ATTACK_DEFAULTS`)."""
    from patchlab.probes.quantization import quantize_

    if variant == "relearned":
        return finetune(copy.deepcopy(model), tokenizer, records, **attacks["relearning"])
    return quantize_(copy.deepcopy(model), attacks["quantization"]["bits"]).eval()


# ------------------------------------------------------------------------------------------------ one member

def evaluate_member(zoo: Mapping[str, Any], name: str, probes: Sequence[str],
                    settings: Mapping[str, Mapping[str, Any]] | None, attacks: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, Any]:
    """Audit one zoo member against the full model (and, for ``unlearned`` and ``retain`` members, its attacked
    copies): ``{"name", "role", "scores": {variant: {probe: {"m", "score", "verdict"}}}, "seconds"}``.

    A plain function of JSON-like arguments (``zoo`` is :meth:`Zoo.to_dict`), so it runs the same in-process and as
    a Ray task.
    """
    from patchlab.pair import load_pair, load_tokenizer
    from patchlab.probes.scoring import references

    start = time.perf_counter()
    z = Zoo.from_dict(zoo)
    member = z.member(name)
    tok = load_tokenizer(z.full.source)
    full = z.full.load()
    retain = z.retain.load() if z.retain is not None else None
    model = member.load()  # a copy of its own, also for the full member (a pair holds two distinct models)
    variants = {"before": model}
    if member.role in ("unlearned", "retain"):
        from patchlab.probes.base import COMMON_DEFAULTS

        common = {**COMMON_DEFAULTS, **(settings or {}).get("common", {})}
        records = references(full, tok, z.questions, common).records()
        variants.update({v: attacked(model, v, tok, records, attacks) for v in VARIANTS[1:]})
    scores = {}
    for variant, candidate in variants.items():
        case = AuditCase(name, load_pair(full, candidate, tokenizer=tok), z.questions, z.unrelated, retain)
        report = audit_many([case], probes=list(probes), settings=settings, progress=False)
        scores[variant] = {p: {"m": knowledge(r), "score": r.score.to_list(), "verdict": r.verdict}
                           for p, r in report.runs[0].results.items()}
    return {"name": name, "role": member.role, "note": member.note, "scores": scores,
            "seconds": round(time.perf_counter() - start, 2)}


# ------------------------------------------------------------------------------------------------ statistics

def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """AUC-ROC of scores separating ``positive`` from ``negative`` (Mann-Whitney: the share of (P, N) pairs with
    P > N, ties counting 1/2); NaN with an empty side."""
    p, n = np.asarray(positive, float), np.asarray(negative, float)
    if p.size == 0 or n.size == 0:
        return math.nan
    diff = p[:, None] - n[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def auc_interval(positive: Sequence[float], negative: Sequence[float], *, n_boot: int, level: float, seed: int
                 ) -> list[float]:
    """``[auc, low, high]``: the AUC and its percentile bootstrap interval, P and N resampled separately."""
    p, n = np.asarray(positive, float), np.asarray(negative, float)
    value = auc(p, n)
    if math.isnan(value):
        return [math.nan] * 3
    rng = np.random.default_rng(seed)
    diff = (p[rng.integers(0, p.size, (n_boot, p.size))][:, :, None]
            - n[rng.integers(0, n.size, (n_boot, n.size))][:, None, :])  # [boot, P, N], all resamples at once
    boots = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return [value, float(low), float(high)]


def robustness(models: Sequence[Mapping[str, Any]], probe: str) -> dict[str, Any]:
    """R, Q and HM of ``probe`` over the unlearned members of ``models`` (module docstring), with the per-model
    ratios and how many were defined."""
    def m(record: Mapping[str, Any], variant: str) -> float:
        value = record["scores"].get(variant, {}).get(probe, {}).get("m")
        return math.nan if value is None else float(value)

    retain = next((r for r in models if r["role"] == "retain"), None)
    d_ret = m(retain, "before") - m(retain, "relearned") if retain is not None else math.nan
    per_model = {}
    for r in (r for r in models if r["role"] == "unlearned"):
        d_unl = m(r, "before") - m(r, "relearned")
        ratio_r = min(d_ret / d_unl, 1.0) if d_unl != 0 and not math.isnan(d_unl) else math.nan
        before = m(r, "before")
        ratio_q = min(m(r, "quantized") / before, 1.0) if before != 0 and not math.isnan(before) else math.nan
        per_model[r["name"]] = {"R": ratio_r, "Q": ratio_q}
    rs = [v["R"] for v in per_model.values() if not math.isnan(v["R"])]
    qs = [v["Q"] for v in per_model.values() if not math.isnan(v["Q"])]
    mean_r = float(np.mean(rs)) if rs else math.nan
    mean_q = float(np.mean(qs)) if qs else math.nan
    hm = 2 * mean_r * mean_q / (mean_r + mean_q) if rs and qs and mean_r + mean_q != 0 else math.nan
    return {"R": mean_r, "Q": mean_q, "HM": hm, "n_R": len(rs), "n_Q": len(qs), "per_model": per_model}


# ------------------------------------------------------------------------------------------------ the result

class ReadingFile(Schema):
    """One probe on one audited variant of a member: the knowledge reading ``m`` (``null`` when undefined), the
    headline ``score`` as ``[value, low, high]`` (each ``null`` when undefined) and the ``verdict``."""

    m: float | None
    score: Annotated[list[float | None], Field(min_length=3, max_length=3)]
    verdict: Annotated[str, Field(min_length=1)]


class MemberRecordFile(Schema):
    """One member's record in a meta-evaluation file (:func:`evaluate_member`): per audited variant (``before``
    always), per probe, its :class:`ReadingFile`."""

    name: Annotated[str, Field(min_length=1)]
    role: Literal[ROLES]
    note: str = ""
    scores: dict[Literal[VARIANTS], dict[str, ReadingFile]]
    seconds: Annotated[float, Field(ge=0)]
    digest: str | None = None

    @model_validator(mode="after")
    def _before(self) -> MemberRecordFile:
        if "before" not in self.scores:
            raise bad("scores", "no 'before' variant (the member as it is)")
        return self


class BootFile(Schema):
    """The faithfulness bootstrap: resamples, central interval level, seed."""

    n_boot: Annotated[int, Field(ge=1, le=MAX_BOOT)]
    level: Annotated[float, Field(gt=0, lt=1)]
    seed: int


class MetaEvalSettingsFile(Schema):
    """The settings a meta-evaluation ran with: the probes' (free), the attacks' (free) and the bootstrap's."""

    probes: dict[str, FreeJson]
    attacks: dict[str, FreeJson]
    bootstrap: BootFile


class MetaEvalFile(Schema):
    """A :class:`MetaEvalResult` file: the probes, their orientation and summary, every member's record (distinct
    names)."""

    format: Literal["patchlab.MetaEval/1"]
    target: str
    probes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    orientation: dict[str, str]
    summary: dict[str, FreeJson]
    models: Annotated[list[MemberRecordFile], Field(min_length=1)]
    settings: MetaEvalSettingsFile
    provenance: dict[str, FreeJson]

    @model_validator(mode="after")
    def _distinct(self) -> MetaEvalFile:
        names = [r.name for r in self.models]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise bad(f"models[{i}].name", "a second member named {name!r}", name=name)
        return self


@register_result
@dataclass
class MetaEvalResult(Result):
    """A meta-evaluation: per probe, faithfulness (AUC with interval) and robustness (R, Q, HM), and every member's
    knowledge readings.

    Attributes:
        target: the zoo's target. probes: the probes evaluated (report order).
        models: per member, :func:`evaluate_member`'s record. orientation: probe -> how its reading is oriented.
        settings: the probe settings, attacks and bootstrap it ran with. provenance: the zoo and the versions.
    """

    kind = "meta_eval"
    format = META_EVAL_FORMAT
    schema = MetaEvalFile

    target: str
    probes: list[str]
    models: list[dict[str, Any]]
    orientation: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def pools(self, probe: str) -> dict[str, list[float]]:
        """``{"P": [...], "N": [...]}``: the defined readings of ``probe`` on the P and N members."""
        out: dict[str, list[float]] = {"P": [], "N": []}
        for r in self.models:
            pool = "P" if r["role"] in POSITIVE_ROLES else "N" if r["role"] in NEGATIVE_ROLES else None
            value = r["scores"]["before"].get(probe, {}).get("m")
            if pool and value is not None and not math.isnan(value):
                out[pool].append(float(value))
        return out

    def false_knowledge(self, probe: str) -> list[str]:
        """The N members (never saw the target) on which ``probe``'s verdict says the knowledge is there
        (:data:`KNOWS`): the probe's false alarms."""
        return [r["name"] for r in self.models if r["role"] in NEGATIVE_ROLES
                and r["scores"]["before"].get(probe, {}).get("verdict") in KNOWS]

    def summary(self, probe: str) -> dict[str, Any]:
        """Faithfulness and robustness of ``probe``: ``auc`` ``[value, low, high]``, ``n_P``, ``n_N``, ``R``,
        ``Q``, ``HM``, ``n_R``, ``n_Q``, and ``n_false``, how many N members its verdict calls hidden or intact
        (:meth:`false_knowledge`)."""
        if probe not in self.probes:
            raise PatchlabValueError(f"no probe {probe!r} in this meta-evaluation; it has {self.probes}")
        pools = self.pools(probe)
        boot = self.settings.get("bootstrap", BOOT)
        rob = robustness(self.models, probe)
        return {"auc": auc_interval(pools["P"], pools["N"], **boot), "n_P": len(pools["P"]), "n_N": len(pools["N"]),
                **{k: rob[k] for k in ("R", "Q", "HM", "n_R", "n_Q")}, "n_false": len(self.false_knowledge(probe))}

    def to_frame(self) -> pd.DataFrame:
        """One row per probe: ``probe``, ``auc``, ``auc_low``, ``auc_high``, ``n_P``, ``n_N``, ``n_false``, ``R``,
        ``Q``, ``HM``,
        ``n_R``, ``n_Q``, ``orientation``."""
        rows = []
        for probe in self.probes:
            s = self.summary(probe)
            rows.append({"probe": probe, "auc": s["auc"][0], "auc_low": s["auc"][1], "auc_high": s["auc"][2],
                         **{k: s[k] for k in ("n_P", "n_N", "n_false", "R", "Q", "HM", "n_R", "n_Q")},
                         "orientation": self.orientation.get(probe, "")})
        return pd.DataFrame(rows)

    def trusted(self, *, min_auc: float = 0.8, min_hm: float = 0.5) -> dict[str, str]:
        """Probe -> why it is trusted or not: trusted when the AUC is at least ``min_auc`` with its interval's lower
        bound above 0.5, its verdict calls no N member hidden or intact (:meth:`false_knowledge`), and HM (when
        defined) is at least ``min_hm``."""
        out = {}
        for probe in self.probes:
            s = self.summary(probe)
            value, low, high = s["auc"]
            hm, false = s["HM"], self.false_knowledge(probe)
            ok = (not math.isnan(value) and value >= min_auc and low > 0.5 and not false
                  and (math.isnan(hm) or hm >= min_hm))
            alarms = f"calls {len(false)} of {s['n_N']} never-saw models {'/'.join(KNOWS)} ({', '.join(false)})" \
                if false else f"calls none of {s['n_N']} never-saw models {'/'.join(KNOWS)}"
            out[probe] = (f"{'trusted' if ok else 'not trusted'}: AUC {_fmt(value)} [{_fmt(low)}, {_fmt(high)}] "
                          f"(P {s['n_P']} vs N {s['n_N']}); {alarms}; HM {_fmt(hm)} (R {_fmt(s['R'])}, "
                          f"Q {_fmt(s['Q'])})")
        return out

    def trust(self) -> dict[str, Any]:
        """The compact record the audit reads (:func:`read_trust`): target, per-probe table and trust, orientation,
        members (name, role, note) and settings; no paths."""
        from patchlab.probes.report import _json_safe

        return _json_safe({"format": TRUST_FORMAT, "target": self.target,
                           "summary": {p: self.summary(p) for p in self.probes}, "trusted": self.trusted(),
                           "orientation": self.orientation,
                           "members": [{k: r.get(k, "") for k in ("name", "role", "note")} for r in self.models],
                           "settings": self.settings})

    def write_trust(self, path: str | os.PathLike, *, command: str = "") -> Path:
        """Write :meth:`trust` (and the ``command`` that regenerates it) as JSON, atomically; returns the path."""
        return atomic_write_json(path, {**self.trust(), "command": command})

    def to_dict(self) -> dict[str, Any]:
        from patchlab.probes.report import _json_safe

        return _json_safe({"target": self.target, "probes": self.probes, "orientation": self.orientation,
                           "summary": {p: self.summary(p) for p in self.probes}, "models": self.models,
                           "settings": self.settings, "provenance": self.provenance})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaEvalResult:
        models = [_nan_models(r) for r in data["models"]]
        return cls(target=data["target"], probes=list(data["probes"]), models=models,
                   orientation=dict(data["orientation"]), settings=dict(data.get("settings", {})),
                   provenance=dict(data.get("provenance", {})))

    def html(self) -> str:
        """One self-contained page: the table, then the histograms (plotly's JavaScript inlined)."""
        frame = self.to_frame()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ("probe", "AUC [95% CI]", "P / N", "false alarms on N",
                                                               "R", "Q", "HM", "trust", "reading (orientation)"))
        trust = self.trusted()
        rows = "".join(
            f"<tr><th>{html.escape(r.probe)}</th><td>{_fmt(r.auc)} [{_fmt(r.auc_low)}, {_fmt(r.auc_high)}]</td>"
            f"<td>{r.n_P} / {r.n_N}</td><td>{r.n_false}</td><td>{_fmt(r.R)} (n={r.n_R})</td>"
            f"<td>{_fmt(r.Q)} (n={r.n_Q})</td><td>{_fmt(r.HM)}</td><td>{html.escape(trust[r.probe])}</td>"
            f"<td>{html.escape(r.orientation)}</td></tr>" for r in frame.itertuples())
        members = "".join(f"<li><b>{html.escape(r['name'])}</b> ({r['role']}): {html.escape(r.get('note', ''))}</li>"
                          for r in self.models)
        body = self.figure().to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        return _PAGE.format(js=plotly.offline.get_plotlyjs(), target=html.escape(self.target), head=head, rows=rows,
                            members=members, figure=body)

    def figures(self) -> dict[str, str]:
        return {self.kind: self.html()}


def read_trust(path: str | os.PathLike) -> dict[str, Any]:
    """A trust file written by :meth:`MetaEvalResult.write_trust`: ``{"target", "summary", "trusted", ...}``.

    Raises:
        PatchlabFileError: no such file. PatchlabValueError: not JSON, or not a trust file.
    """
    data = read_json(path, what="probe trust file")
    if not isinstance(data, dict) or data.get("format") != TRUST_FORMAT or "trusted" not in data:
        raise PatchlabValueError(f"{path} is not a patchlab probe trust file (format {TRUST_FORMAT})")
    return data


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _nan_models(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored member record with JSON ``null`` readings back as NaN."""
    scores = {v: {p: {**s, "m": math.nan if s["m"] is None else s["m"]} for p, s in probes.items()}
              for v, probes in record["scores"].items()}
    return {**record, "scores": scores}


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Probe meta-evaluation</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 24px 40px; max-width: 1400px; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 5px 9px; font-size: 14px; }}</style>
<script type="text/javascript">{js}</script></head><body>
<h1>Probe meta-evaluation: {target}</h1>
<p>Faithfulness: AUC-ROC of each probe's knowledge reading separating models that know the target (P) from models
that never saw it (N), 95% bootstrap interval. Robustness on the unlearned models: R = min((m_ret before - after) /
(m_unl before - after), 1) under the relearning attack, Q = min(m_unl after / before, 1) under quantization,
HM their harmonic mean. False alarms: never-saw (N) models the probe's own verdict calls hidden or intact.</p>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{figure}
<h2>Members</h2><ul>{members}</ul>
</body></html>
"""


# ------------------------------------------------------------------------------------------------ the run

def meta_eval(zoo: Zoo, probes: Sequence[str] | None = None, *, settings: Mapping[str, Mapping[str, Any]] | None = None,
              attacks: Mapping[str, Mapping[str, Any]] | None = None, bootstrap: Mapping[str, Any] | None = None,
              out_dir: Any = None, overwrite: bool = False, ray: bool = False, ray_address: str | None = None,
              num_gpus: float = 0, num_cpus: float = 1, progress: bool = True) -> MetaEvalResult:
    """Meta-evaluate ``probes`` (default: every registered probe with a knowledge reading, :data:`READINGS`; those
    needing a retain model only when the zoo has one) on ``zoo`` (module docstring).

    Args:
        settings: probe settings, as :func:`patchlab.audit` takes them. attacks: overrides of
            :data:`ATTACK_DEFAULTS` (``{"relearning": {...}, "quantization": {...}}``). bootstrap: overrides of
            :data:`BOOT`.
        out_dir: if given, claimed as a ``"meta_eval"`` output keyed by the target, questions, the full and retain
            models, probes and settings; each member's record is written there (``models/<name>.json``) as it
            finishes and reused on a rerun while the member's checkpoint digest (:meth:`Member.digest`) is the
            same, so members can be added to a zoo; the report (``meta_eval.json``, ``.csv``, ``.html``) is written
            at the end. Another run's directory is replaced only with ``overwrite=True``.
        ray, ray_address: run each member as a Ray task (``ray.init()`` locally, or the cluster at ``ray_address``),
            ``num_gpus`` / ``num_cpus`` per task. Default: in-process; same numbers either way.

    Raises:
        PatchlabValueError: not a Zoo, an unknown probe or one without a reading, a bad setting or attack, no P or no
            N member. MissingDependencyError: Ray asked for but not installed.
    """
    if not isinstance(zoo, Zoo):
        raise PatchlabValueError(f"meta_eval takes a patchlab.zoo.Zoo (patchlab.zoo.load_zoo), got "
                                 f"{type(zoo).__name__}")
    chosen = [p.name for p in select(probes) if probes is not None or p.name in READINGS]
    lacking = [p for p in chosen if p not in READINGS]
    if lacking:
        raise PatchlabValueError(f"probe(s) {lacking} have no knowledge reading; add one with register_reading")
    needs_retain = [p for p in chosen if "retain" in PROBES[p].needs]
    if zoo.retain is None and needs_retain:
        if probes is not None:
            raise PatchlabValueError(f"probe(s) {needs_retain} need a retain model: give the zoo a 'retain' member")
        chosen = [p for p in chosen if p not in needs_retain]
    needs_unrelated = [p for p in chosen if "unrelated" in PROBES[p].needs]
    if zoo.unrelated is None and needs_unrelated:
        if probes is not None:
            raise PatchlabValueError(f"probe(s) {needs_unrelated} need unrelated questions: give the zoo 'unrelated'")
        chosen = [p for p in chosen if p not in needs_unrelated]
    if not zoo.by_role(*POSITIVE_ROLES) or not zoo.by_role(*NEGATIVE_ROLES):
        raise PatchlabValueError("a meta-evaluation needs at least one negative member besides the full model")
    resolved_attacks = check_attacks(attacks)
    check_resources(num_gpus, num_cpus)
    boot = {**BOOT, **(bootstrap or {})}
    if not isinstance(boot["n_boot"], int) or not 1 <= boot["n_boot"] <= MAX_BOOT or not 0 < boot["level"] < 1:
        raise PatchlabValueError(f"bootstrap needs n_boot in 1..{MAX_BOOT} and level in (0, 1), got {boot}")
    from patchlab.probes.registry import resolve_settings

    resolve_settings([PROBES[p] for p in chosen], settings)  # unknown sections or options raise before any compute
    zoo_dict = zoo.to_dict()
    run_settings = {"probes": dict(settings or {}), "attacks": resolved_attacks, "bootstrap": boot}
    out = None
    digests = {m.name: m.digest() for m in zoo.members}
    if out_dir is not None:  # keyed by what every member's record depends on: members may be added or changed
        reference = {k: zoo_dict[k] for k in ("target", "questions", "unrelated")}
        key = settings_key({**reference, "full": digests[zoo.full.name],
                            "retain": digests[zoo.retain.name] if zoo.retain else None, "probes": chosen,
                            **run_settings})
        out = output_dir(out_dir, "meta_eval", overwrite=overwrite, resume=True, key=key)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for member in zoo.members:
        path = out.path / f"models/{slug(member.name)}.json" if out is not None else None
        stored = read_json(path) if out is not None and out.resumed and path.is_file() else None
        if stored is not None and stored.get("digest") == digests[member.name]:
            records[member.name] = _nan_models(stored)
        else:
            todo.append(member.name)

    def done(record: dict[str, Any]) -> None:
        record["digest"] = digests[record["name"]]
        records[record["name"]] = record
        if out is not None:
            from patchlab.probes.report import _json_safe

            out.write(f"models/{slug(record['name'])}.json",
                      lambda path: atomic_write_json(path, _json_safe(record)))

    run_tasks(evaluate_member, [(zoo_dict, name, chosen, settings, resolved_attacks) for name in todo], done,
              ray=ray, ray_address=ray_address, num_gpus=num_gpus, num_cpus=num_cpus, progress=progress,
              desc="meta-eval")
    result = MetaEvalResult(target=zoo.target, probes=chosen, models=[records[m.name] for m in zoo.members],
                            orientation={p: READINGS[p].orientation for p in chosen}, settings=run_settings,
                            provenance={"zoo": zoo_dict, "environment": environment()})
    if out is not None:
        result.write_report(out)
    return result


def check_attacks(attacks: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """:data:`ATTACK_DEFAULTS` overridden by ``attacks``, validated."""
    resolved = copy.deepcopy(ATTACK_DEFAULTS)
    for name, values in (attacks or {}).items():
        if name not in resolved or not isinstance(values, Mapping):
            raise PatchlabValueError(f"unknown attack {name!r}; choose from {list(resolved)} (each a mapping)")
        unknown = sorted(set(values) - set(resolved[name]))
        if unknown:
            raise PatchlabValueError(f"unknown {name} attack option(s) {unknown}; choose from {sorted(resolved[name])}")
        resolved[name].update(values)
    r, q = resolved["relearning"], resolved["quantization"]
    if not isinstance(r["steps"], int) or r["steps"] < 1 or not r["lr"] > 0 or not isinstance(r["batch_size"], int) \
            or r["batch_size"] < 1:
        raise PatchlabValueError(f"the relearning attack needs steps >= 1, lr > 0, batch_size >= 1; got {r}")
    if not isinstance(q["bits"], int) or not 2 <= q["bits"] <= 16:
        raise PatchlabValueError(f"the quantization attack needs bits in 2..16, got {q['bits']!r}")
    return resolved
