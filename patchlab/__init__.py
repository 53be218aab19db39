"""patchlab: did fine-tuning really erase the knowledge, or only hide it?

Load a vanilla checkpoint and its unlearned copy as a pair, restore pieces of the vanilla computation
inside the unlearned model, and measure how much of the forgotten knowledge comes back (KRS).

``import patchlab`` is light: the errors are loaded at once, every other name (and subpackage) on first use, so
the command-line scripts answer ``--help`` and argument errors before torch and transformers load.
"""

from __future__ import annotations

from patchlab.errors import (DegenerateKRSError, DegenerateMetricError, MissingDependencyError, NonFiniteError,
                             PairMismatchError, PatchlabError, PatchlabFileError, PatchlabValueError,
                             UnsupportedArchitectureError)

from patchlab.registry import lazy_exports
from patchlab.version import __version__

#: Where each public name lives: ``{name: (module, attribute)}``; attribute None means the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    **{name: ("patchlab.pair.arch", name) for name in ("ArchSpec", "arch_spec", "register_architecture",
                                                       "register_site", "supported_architectures",
                                                       "unregister_site")},
    **{name: ("patchlab.pair.sites", name) for name in ("Site", "parse_component")},
    **{name: ("patchlab.patching.loop", name) for name in ("ActivationCache", "run_with_cache")},
    **{name: ("patchlab.patching.metrics", name) for name in ("References", "metrics", "register_metric")},
    **{name: ("patchlab.patching.restore", name) for name in ("RestoreKind", "register_restore_kind")},
    **{name: ("patchlab.patching.result", name) for name in ("KRSResult", "PatchComparison", "PatchResult",
                                                             "compare")},
    **{name: ("patchlab.patching.sweep", name) for name in ("krs_sweep", "patch_sweep")},
    "load_result": ("patchlab.results", "load_result"),
    **{name: ("patchlab.unlearning", name) for name in ("UnlearnRun", "load_mask", "save_mask", "unlearn")},
    **{name: ("patchlab.pair", name) for name in ("ModelPair", "load_model", "load_pair")},
    "sliding_windows": ("patchlab.patching.windows", "sliding_windows"),
    "behavior": ("patchlab.analysis.behavior", None),
    "paramdiff": ("patchlab.analysis.paramdiff", None),
    "lens": ("patchlab.patching.lens", None),
    "attribution": ("patchlab.unlearning.attribution", None),
    "editing": ("patchlab.unlearning.editing", None),
    **{name: ("patchlab.probes", name) for name in ("AuditReport", "audit", "audit_many")},
    **{name: ("patchlab.meta_evaluation", name) for name in ("MetaEvalResult", "meta_eval")},
    "zoo": ("patchlab.zoo", None),
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


__all__ = [
    "ActivationCache", "ArchSpec", "AuditReport", "DegenerateKRSError", "DegenerateMetricError", "KRSResult",
    "MetaEvalResult", "MissingDependencyError", "ModelPair", "NonFiniteError", "PairMismatchError", "PatchComparison",
    "PatchResult", "PatchlabError", "PatchlabFileError", "PatchlabValueError", "References", "RestoreKind", "Site",
    "UnlearnRun", "UnsupportedArchitectureError", "arch_spec", "attribution", "audit", "audit_many", "behavior",
    "compare", "editing", "krs_sweep", "lens", "load_mask", "load_model", "load_pair", "load_result", "meta_eval",
    "metrics", "paramdiff", "parse_component", "patch_sweep", "register_architecture", "register_metric",
    "register_restore_kind", "register_site", "run_with_cache", "save_mask", "sliding_windows",
    "supported_architectures", "unlearn", "unregister_site", "zoo",
]
