"""A thin fine-tuning layer that runs unlearning (GA, GradDiff, NPO, NPO+KL, DPO, SimNPO, RMU), optionally masked or
as a LoRA adapter; the methods, editing baselines included, form the registry :mod:`patchlab.unlearning.methods`.

Importing it is light: each name loads (with torch) on first use, so a script's parser can list the registered
methods and their settings before torch loads.
"""

from __future__ import annotations

from patchlab.registry import lazy_exports

#: Where each public name lives: ``{name: (module, attribute)}``.
_LAZY: dict[str, tuple[str, str | None]] = {
    **{name: ("patchlab.unlearning.data", name) for name in ("Example", "batches", "padding_id", "to_examples")},
    **{name: ("patchlab.unlearning.losses", name) for name in ("Reference", "Step", "layer_output", "nll",
                                                                "sequence_logprob", "sequence_nll")},
    **{name: ("patchlab.unlearning.masks", name) for name in ("Mask", "check_mask", "load_mask", "save_mask")},
    **{name: ("patchlab.unlearning.methods", name) for name in ("UNLEARNING_METHODS", "Method", "Needs", "get_method",
                                                                 "method_names", "register_method")},
    **{name: ("patchlab.unlearning.settings", name) for name in ("ReferenceSettings", "TrainingSettings")},
    **{name: ("patchlab.unlearning.trainer", name) for name in ("UnlearnRun", "unlearn")},
}

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

__all__ = ["UNLEARNING_METHODS", "Example", "Mask", "Method", "Needs", "Reference", "ReferenceSettings", "Step",
           "TrainingSettings", "UnlearnRun", "batches", "check_mask", "get_method", "layer_output", "load_mask",
           "method_names", "nll", "padding_id", "register_method", "save_mask", "sequence_logprob", "sequence_nll",
           "to_examples", "unlearn"]
