"""A thin fine-tuning layer that runs unlearning (GA, GradDiff, NPO, NPO+KL, DPO), optionally masked."""

from patchlab.unlearning.data import Example, batches, padding_id, to_examples
from patchlab.unlearning.losses import METHODS, nll, sequence_logprob, sequence_nll
from patchlab.unlearning.masks import Mask, check_mask, load_mask, save_mask
from patchlab.unlearning.trainer import UnlearnRun, unlearn

__all__ = ["METHODS", "Example", "Mask", "UnlearnRun", "batches", "check_mask", "load_mask", "nll", "padding_id",
           "save_mask", "sequence_logprob", "sequence_nll", "to_examples", "unlearn"]
