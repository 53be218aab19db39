"""patchlab: did fine-tuning really erase the knowledge, or only hide it?

Load a vanilla checkpoint and its unlearned copy as a pair, restore pieces of the vanilla computation
inside the unlearned model, and measure how much of the forgotten knowledge comes back (KRS).
"""

from patchlab.pair.arch import ArchSpec, arch_spec, register_architecture, supported_architectures
from patchlab.errors import (DegenerateKRSError, MissingDependencyError, NonFiniteError, PairMismatchError,
                             PatchlabError, PatchlabFileError, PatchlabValueError, UnsupportedArchitectureError)
from patchlab.patching.interventions import ActivationCache, parse_component, run_with_cache
from patchlab.patching.krs import KRSResult, krs_sweep
from patchlab.unlearning import UnlearnRun, load_mask, save_mask, unlearn
from patchlab.pair import ModelPair, load_model, load_pair
from patchlab.patching.windows import sliding_windows
from patchlab.analysis import behavior, paramdiff
from patchlab.patching import lens
from patchlab.unlearning import attribution, editing
from patchlab.audit import AuditReport, audit  # the function shadows the subpackage's name on purpose

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "ArchSpec", "AuditReport", "DegenerateKRSError", "KRSResult", "MissingDependencyError",
    "ModelPair", "NonFiniteError", "PairMismatchError", "PatchlabError", "PatchlabFileError", "PatchlabValueError",
    "UnlearnRun", "UnsupportedArchitectureError", "arch_spec", "audit", "krs_sweep", "load_mask", "load_model",
    "load_pair", "parse_component", "register_architecture", "run_with_cache", "save_mask", "sliding_windows",
    "supported_architectures", "unlearn",
]
