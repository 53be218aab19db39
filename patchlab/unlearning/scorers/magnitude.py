"""Magnitude baseline: ``|W|`` per weight of every parameter."""

from __future__ import annotations

from transformers import PreTrainedModel

from patchlab.unlearning.scorers import ScoreInputs, WeightScores


def magnitude_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    """``|W|`` (float32, each parameter's shape); ``inputs`` are not read."""
    return {n: p.detach().float().abs() for n, p in model.named_parameters()}


SCORER = magnitude_scores
