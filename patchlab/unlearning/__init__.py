"""A thin fine-tuning layer that runs unlearning (GA, GradDiff, NPO, NPO+KL, DPO), optionally masked."""

from patchlab.unlearning.data import Example, batches, to_examples
from patchlab.unlearning.losses import METHODS, nll, sequence_logprob
from patchlab.unlearning.trainer import UnlearnRun, check_mask, unlearn

__all__ = ["Example", "METHODS", "UnlearnRun", "batches", "check_mask", "nll", "sequence_logprob", "to_examples",
           "unlearn"]
