"""Random baseline: scores drawn uniformly in ``[0, 1)`` per weight of every parameter."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from patchlab.unlearning.scorers import ScoreInputs, WeightScores


def random_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    """Uniform ``[0, 1)`` scores (float32, each parameter's shape), drawn on the CPU from ``inputs.seed`` in
    parameter order."""
    gen = torch.Generator().manual_seed(inputs.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in model.named_parameters()}


SCORER = random_scores
