"""A thin fine-tuning layer that runs unlearning (GA, GradDiff, NPO, NPO+KL, DPO, SimNPO, RMU), optionally masked or
as a LoRA adapter; the methods, editing baselines included, form the registry :mod:`patchlab.unlearning.methods`."""

from patchlab.unlearning.data import Example, batches, padding_id, to_examples
from patchlab.unlearning.losses import Reference, Step, layer_output, nll, sequence_logprob, sequence_nll
from patchlab.unlearning.masks import Mask, check_mask, load_mask, save_mask
from patchlab.unlearning.methods import UNLEARNING_METHODS, Method, Needs, get_method, method_names, register_method
from patchlab.unlearning.trainer import UnlearnRun, unlearn

__all__ = ["UNLEARNING_METHODS", "Example", "Mask", "Method", "Needs", "Reference", "Step", "UnlearnRun", "batches",
           "check_mask", "get_method", "layer_output", "load_mask", "method_names", "nll", "padding_id",
           "register_method", "save_mask", "sequence_logprob", "sequence_nll", "to_examples", "unlearn"]
