"""patchlab: did fine-tuning really erase the knowledge, or only hide it?

Load a vanilla checkpoint and its unlearned copy as a pair, restore pieces of the vanilla computation
inside the unlearned model, and measure how much of the forgotten knowledge comes back (KRS).
"""

from patchlab.errors import (DegenerateKRSError, DegenerateMetricError, MissingDependencyError, NonFiniteError,
                             PairMismatchError, PatchlabError, PatchlabFileError, PatchlabValueError,
                             UnsupportedArchitectureError)
from patchlab.pair.arch import (ArchSpec, arch_spec, register_architecture, register_site, supported_architectures,
                                unregister_site)
from patchlab.pair.sites import Site, parse_component
from patchlab.patching.loop import ActivationCache, run_with_cache
from patchlab.patching.metrics import References, metrics, register_metric
from patchlab.patching.result import KRSResult, PatchComparison, PatchResult, compare
from patchlab.patching.sweep import krs_sweep, patch_sweep
from patchlab.reports.results import load_result
from patchlab.unlearning import UnlearnRun, load_mask, save_mask, unlearn
from patchlab.pair import ModelPair, load_model, load_pair
from patchlab.patching.windows import sliding_windows
from patchlab.analysis import behavior, paramdiff
from patchlab.patching import lens
from patchlab.unlearning import attribution, editing
from patchlab.probes import AuditReport, audit, audit_many
from patchlab import zoo
from patchlab.meta_evaluation import MetaEvalResult, meta_eval

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "ArchSpec", "AuditReport", "DegenerateKRSError", "DegenerateMetricError", "KRSResult",
    "MetaEvalResult", "MissingDependencyError", "ModelPair", "NonFiniteError", "PairMismatchError", "PatchComparison",
    "PatchResult", "PatchlabError", "PatchlabFileError", "PatchlabValueError", "References", "Site", "UnlearnRun",
    "UnsupportedArchitectureError", "arch_spec", "attribution", "audit", "audit_many", "behavior", "compare", "editing",
    "krs_sweep", "lens", "load_mask", "load_model", "load_pair", "load_result", "meta_eval", "metrics", "paramdiff",
    "parse_component", "patch_sweep", "register_architecture", "register_metric", "register_site", "run_with_cache",
    "save_mask", "sliding_windows", "supported_architectures", "unlearn", "unregister_site", "zoo",
]
