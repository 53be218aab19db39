"""Residual-knowledge audit: did unlearning erase the knowledge, or only hide it?

Several probes, one registry entry each (:data:`PROBES`), run on the same pair and reported side by side, each with
a headline score, a bootstrap confidence interval over questions and a verdict (erased / hidden / intact)::

    import patchlab
    from patchlab import toy

    tp = toy.pair(method="graddiff", retain=True)
    report = patchlab.audit(tp.pair, tp.questions, unrelated=tp.unrelated_questions, retain=tp.retain_model)
    print(report.verdicts())
    report.write_report("results/audit")        # audit.json, audit.csv, self-contained audit.html

Probes: ``krs`` (:mod:`patchlab.probes.krs`), ``relearning`` (:mod:`patchlab.probes.relearning`), ``quantization``
(:mod:`patchlab.probes.quantization`), ``behavior`` (:mod:`patchlab.probes.behavior`). A new probe is one module with
a :class:`Probe` entry, added to :data:`PROBES` (or :func:`register_probe`); its figure is registered by name in the
presentation layer (:mod:`patchlab.reports.views`) or given as the entry's ``draw``. Its function is called as
``run(pair, questions, *, unrelated, retain, settings, progress, baselines)`` (:class:`patchlab.probes.base.ProbeFn`;
``baselines``, a :class:`Baselines`, holds the reference answers and vanilla / unlearned scores the probes of one
audited case share).

``patchlab.audit`` is the :func:`audit` function; this package holds the probes, their registry and the report.
"""

from patchlab.pair.qa import QA
from patchlab.probes.base import (COMMON_DEFAULTS, HIDDEN_SHARE, INTACT_SHARE, VERDICTS, Interval, Probe, ProbeResult,
                                 as_questions)
from patchlab.probes.bootstrap import bootstrap
from patchlab.probes.registry import PROBES, register_probe, resolve_settings
from patchlab.probes.report import AuditReport, AuditRun
from patchlab.probes.run import AuditCase, audit, audit_many
from patchlab.probes.scoring import Baselines

__all__ = ["COMMON_DEFAULTS", "HIDDEN_SHARE", "INTACT_SHARE", "PROBES", "QA", "VERDICTS", "AuditCase", "AuditReport",
           "AuditRun", "Baselines", "Interval", "Probe", "ProbeResult", "as_questions", "audit", "audit_many",
           "bootstrap", "register_probe", "resolve_settings"]
