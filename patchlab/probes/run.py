"""Running an audit: every selected probe on every audited pair, resumable in an output directory."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from patchlab.probes.base import Probe, ProbeResult, as_questions, check_common
from patchlab.probes.registry import COMMON, PROBES, probe_settings, resolve_settings, select
from patchlab.probes.report import AuditReport, AuditRun
from patchlab.probes.scoring import Baselines
from patchlab.distributed import check_resources, run_tasks
from patchlab.errors import PatchlabValueError
from patchlab.io import OutputDir, atomic_write_json, output_dir, read_json
from patchlab.pair import ModelPair
from patchlab.pair.generation import resolve_template
from patchlab.provenance import checkpoint_record, environment, settings_key

@dataclass
class AuditCase:
    """One pair to audit and its data.

    Attributes:
        label: its name in the report (distinct per audit).
        pair: the vanilla / unlearned :class:`patchlab.pair.ModelPair`.
        questions: the target questions (strings, ``{"question", "answer"}`` records or objects with ``.question``
            / ``.answer``; normalised to :class:`~patchlab.pair.qa.QA`). Without answers the vanilla greedy answers
            are the reference.
        unrelated: unrelated questions, same forms (the behaviour probe and the benign relearning attack).
        retain: a model that never saw the concept (same architecture and tokenizer), for the probes that need one.
        sources: how each checkpoint was given (``"vanilla"``, ``"unlearned"``, ``"retain"`` -> a path, hub id or
            description) for the provenance; default: the in-memory model.
    """

    label: str
    pair: ModelPair
    questions: Sequence[Any]
    unrelated: Sequence[Any] | None = None
    retain: PreTrainedModel | None = None
    sources: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not slug(self.label):
            raise PatchlabValueError(f"an audited pair needs a label with a letter or digit, got {self.label!r}")
        if not isinstance(self.pair, ModelPair):
            raise PatchlabValueError(f"pair must be a patchlab ModelPair (patchlab.load_pair), got "
                                     f"{type(self.pair).__name__}")
        if self.retain is not None and not isinstance(self.retain, PreTrainedModel):
            raise PatchlabValueError(f"retain must be an in-memory model (patchlab.load_model), got "
                                     f"{type(self.retain).__name__}")
        self.questions = as_questions(self.questions, "target")
        self.unrelated = as_questions(self.unrelated, "unrelated") if self.unrelated is not None else None

    def missing(self, probe: Probe) -> list[str]:
        """The inputs ``probe`` needs that this case lacks."""
        have = {"unrelated": self.unrelated is not None, "retain": self.retain is not None}
        return [need for need in probe.needs if not have.get(need, False)]

    def provenance(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Checkpoint sources and weight digests, tokenizer digest, questions and ``settings``: everything a stored
        result depends on (the versions are added by :func:`audit_many`, outside the resume key)."""
        models = {"vanilla": self.pair.vanilla_hf, "unlearned": self.pair.unlearned_hf, "retain": self.retain}
        vocab = sorted(self.pair.tokenizer.get_vocab().items())
        return {"checkpoints": {role: checkpoint_record(self.sources.get(role, model), model)
                                for role, model in models.items() if model is not None},
                "tokenizer": xxhash.xxh3_128_hexdigest(repr(vocab).encode()),
                "questions": [asdict(q) for q in self.questions],
                "unrelated": [asdict(q) for q in self.unrelated] if self.unrelated is not None else None,
                "settings": settings}


def slug(label: str) -> str:
    """A file-name form of a label: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _plan(cases: Sequence[AuditCase], probes: list[Probe], explicit: bool
          ) -> list[tuple[list[Probe], dict[str, str]]]:
    """Per case, the probes to run and the skipped ones with why; an explicitly asked probe that lacks an input
    raises instead."""
    plan = []
    for case in cases:
        todo, skipped = [], {}
        for probe in probes:
            missing = case.missing(probe)
            if missing and explicit:
                raise PatchlabValueError(f"probe {probe.name!r} needs {' and '.join(missing)} for {case.label!r}")
            if missing:
                skipped[probe.name] = f"needs {' and '.join(missing)}"
            else:
                todo.append(probe)
        plan.append((todo, skipped))
    return plan


def _run_probe(probe: Probe, case: AuditCase, settings: Mapping[str, Any], out: OutputDir | None,
               progress: bool, baselines: Baselines) -> ProbeResult:
    """The stored result of ``probe`` on ``case`` in a resumed ``out``, else a fresh one (stored there), its
    ``seconds`` the wall time of ``probe.run``; ``baselines``: the case's, shared by its probes."""
    name = f"probes/{slug(case.label)}/{probe.name}.json"
    if out is not None and out.resumed and (out.path / name).is_file():
        return ProbeResult.from_dict(read_json(out.path / name))
    start = time.perf_counter()
    own = probe_settings(settings, probe.name)
    own["template"] = resolve_template(own["template"], case.pair.tokenizer)  # "chat": this pair's chat template
    result = probe.run(case.pair, case.questions, unrelated=case.unrelated, retain=case.retain, settings=own,
                       progress=progress, baselines=baselines)
    result.seconds = round(time.perf_counter() - start, 2)
    if out is not None:
        out.write(name, lambda path: atomic_write_json(path, result.to_dict()))
    return result


def _stored(case: AuditCase, probes: list[Probe], out: OutputDir | None) -> dict[str, ProbeResult]:
    """The results of ``probes`` on ``case`` already in a resumed ``out``."""
    if out is None or not out.resumed:
        return {}
    files = {p.name: out.path / f"probes/{slug(case.label)}/{p.name}.json" for p in probes}
    return {name: ProbeResult.from_dict(read_json(path)) for name, path in files.items() if path.is_file()}


def audit_case(index: int, case: AuditCase, probes: list[Probe], settings: Mapping[str, Any]
               ) -> tuple[int, dict[str, dict[str, Any]]]:
    """``(index, {probe: result dict})``: ``probes`` run on one case, sharing its baselines (a Ray task of
    :func:`audit_many`)."""
    baselines = Baselines()
    return index, {p.name: _run_probe(p, case, settings, None, False, baselines).to_dict() for p in probes}


def audit_many(cases: Sequence[AuditCase], *, probes: Sequence[str] | None = None,
               settings: Mapping[str, Mapping[str, Any]] | None = None, out_dir: Any = None, overwrite: bool = False,
               progress: bool = True, ray: bool = False, ray_address: str | None = None, num_gpus: float = 0,
               num_cpus: float = 1, trust: Mapping[str, Any] | None = None) -> AuditReport:
    """Run the probes on every case and return the side-by-side :class:`AuditReport`.

    Args:
        cases: the pairs to audit (:class:`AuditCase`), in report column order, with distinct labels.
        probes: registry names (:data:`patchlab.probes.PROBES`); default all, skipping for a case those that need an
            input it lacks (noted in the report). Named probes that lack an input raise.
        settings: overrides, ``{"common": {...}, "<probe>": {...}}`` (see
            :func:`patchlab.probes.registry.resolve_settings`).
        out_dir: if given, claimed before any compute as an ``"audit"`` output keyed by the settings and every
            case's checkpoint digests, tokenizer and questions (:func:`patchlab.provenance.settings_key`). Each
            finished probe is written there (``probes/<label>/<probe>.json``) and, when the directory already
            holds this audit, not recomputed; the report (:meth:`AuditReport.write_report`) is written at the end.
            A directory holding an audit of other settings or inputs is replaced only with ``overwrite=True``.
        progress: progress bars (the audit, and each probe's own).
        ray, ray_address: run each case as a Ray task (:func:`patchlab.distributed.run_tasks`: ``ray.init()``
            locally, or the cluster at ``ray_address``; ``num_gpus`` / ``num_cpus`` per task; the case, its models
            included, is sent to the task). Each case's results are written to ``out_dir`` as it finishes. Default:
            in-process, probe by probe; same numbers either way.
        trust: a meta-evaluation's trust file (:func:`patchlab.meta_evaluation.read_trust`), which the report's
            overall verdict (:meth:`AuditReport.overall`) follows.

    Raises:
        PatchlabValueError: no case, repeated labels, an unknown probe or setting, a named probe lacking an input, a
            bad setting value (each probe's ``check`` against every pair, before anything is claimed or computed).
        PatchlabFileError: ``out_dir`` is unusable (see :class:`patchlab.io.OutputDir`).
    """
    cases = list(cases)
    if not cases or not all(isinstance(c, AuditCase) for c in cases):
        raise PatchlabValueError("audit_many needs a non-empty list of AuditCase")
    slugs = [slug(c.label) for c in cases]
    if len(set(slugs)) != len(slugs):
        raise PatchlabValueError(f"audited pairs need labels that differ in letters or digits, got "
                                 f"{[c.label for c in cases]}")
    resolved = resolve_settings(list(PROBES.values()), settings)
    check_resources(num_gpus, num_cpus)
    plan = _plan(cases, select(probes), explicit=probes is not None)
    check_common(resolved[COMMON])
    for case, (todo, _) in zip(cases, plan):  # every setting checked against every pair before any compute
        resolve_template(resolved[COMMON]["template"], case.pair.tokenizer)
        for probe in todo:
            if probe.check is not None:
                probe.check(probe_settings(resolved, probe.name), case.pair)
    provenance = [case.provenance(resolved) for case in cases]
    out = None
    if out_dir is not None:
        out = output_dir(out_dir, "audit", overwrite=overwrite, resume=True, key=settings_key(provenance))
    if ray or ray_address:
        done = _run_on_ray(cases, plan, resolved, out, ray_address=ray_address, num_gpus=num_gpus,
                           num_cpus=num_cpus, progress=progress)
    else:
        done = []
        with tqdm(total=sum(len(todo) for todo, _ in plan), desc="audit", disable=not progress) as bar:
            for case, (todo, _) in zip(cases, plan):
                results = {}
                baselines = Baselines()  # the probes of one case share its reference answers and baseline scores
                for probe in todo:
                    bar.set_postfix_str(f"{case.label}: {probe.name}")
                    results[probe.name] = _run_probe(probe, case, resolved, out, progress, baselines)
                    bar.update(1)
                done.append(results)
    runs = [AuditRun(case.label, results, skipped, {**prov, "environment": environment()})
            for case, prov, results, (_, skipped) in zip(cases, provenance, done, plan)]
    report = AuditReport(runs, trust=dict(trust) if trust is not None else None)
    if out is not None:
        report.write_report(out)
    return report


def _run_on_ray(cases: list[AuditCase], plan: list[tuple[list[Probe], dict[str, str]]],
                resolved: Mapping[str, Any], out: OutputDir | None, **ray_options: Any) -> list[dict[str, ProbeResult]]:
    """Per case, its results: those stored in a resumed ``out``, the others from one Ray task per case, written to
    ``out`` as each task finishes."""
    done = [_stored(case, todo, out) for case, (todo, _) in zip(cases, plan)]
    args = [(i, case, [p for p in todo if p.name not in done[i]], resolved)
            for i, (case, (todo, _)) in enumerate(zip(cases, plan)) if any(p.name not in done[i] for p in todo)]

    def finished(returned: tuple[int, dict[str, dict[str, Any]]]) -> None:
        index, results = returned
        for name, data in results.items():
            done[index][name] = ProbeResult.from_dict(data)
            if out is not None:
                out.write(f"probes/{slug(cases[index].label)}/{name}.json",
                          lambda path, data=data: atomic_write_json(path, data))

    run_tasks(audit_case, args, finished, desc="audit", **ray_options)
    return [{p.name: results[p.name] for p in todo} for results, (todo, _) in zip(done, plan)]


def audit(pair: ModelPair, questions: Sequence[Any], *, unrelated: Sequence[Any] | None = None,
          retain: PreTrainedModel | None = None, probes: Sequence[str] | None = None,
          settings: Mapping[str, Mapping[str, Any]] | None = None, label: str = "unlearned",
          sources: Mapping[str, Any] | None = None, out_dir: Any = None, overwrite: bool = False,
          progress: bool = True) -> AuditReport:
    """Audit one pair: did unlearning erase the knowledge behind ``questions``, or only hide it?

    Runs every probe of :data:`patchlab.probes.PROBES` (or those named in ``probes``) and returns an
    :class:`AuditReport` (verdict table, figures, JSON, HTML). One :class:`AuditCase` through :func:`audit_many`;
    see there for ``probes``, ``settings``, ``out_dir`` (resumable) and ``overwrite``.

    Args:
        pair: the vanilla / unlearned pair.
        questions: target questions: strings, ``{"question", "answer"}`` records or objects with ``.question`` /
            ``.answer`` (e.g. :class:`patchlab.pair.qa.QA`). Without answers the vanilla greedy answers are the
            reference.
        unrelated: unrelated questions, same forms (behaviour probe, benign relearning).
        retain: a model that never saw the concept (e.g. :func:`patchlab.toy.retain`).
        label: the pair's name in the report. sources: how the checkpoints were given, for the provenance.
    """
    case = AuditCase(label, pair, questions, unrelated, retain, dict(sources or {}))
    return audit_many([case], probes=probes, settings=settings, out_dir=out_dir, overwrite=overwrite,
                      progress=progress)
