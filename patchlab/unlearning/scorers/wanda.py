"""Wanda (Sun et al., 2024): ``|W_ij| · ‖X_j‖₂`` per weight of every linear layer, ``‖X_j‖₂`` the L2 norm of
input channel ``j`` over all non-padding tokens of a calibration set; other parameters are not scored."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from patchlab.errors import PatchlabValueError
from patchlab.pair.sites import hooks
from patchlab.unlearning.data import Example, batches
from patchlab.unlearning.scorers import ScoreInputs, WeightScores


def _input_norms(model: PreTrainedModel, examples: list[Example], *, batch_size: int, pad_id: int,
                 progress: bool) -> dict[str, Float[torch.Tensor, "d_in"]]:
    """``‖X_j‖₂`` per input channel ``j`` of every linear (or GPT-2 Conv1D) layer whose weight is a named
    parameter, over all non-padding tokens of ``examples`` (in eval mode: no dropout); keyed by the weight's
    parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def accumulate(name: str) -> Callable:
        def read(x: torch.Tensor) -> None:
            x = x.detach().double() * current["keep"][..., None]
            sums[name] = sums.get(name, 0) + x.pow(2).flatten(0, -2).sum(0)
        return read

    reads = [(m, "input", accumulate(names[id(m.weight)]))
             for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), hooks(reads):
            for batch in tqdm(batches(examples, batch_size, pad_id=pad_id), total=math.ceil(len(examples) / batch_size),
                              desc="wanda calibration", disable=not progress):
                current["keep"] = batch["attention_mask"].to(device, torch.float64)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sums.items()}


def _wanda(model: PreTrainedModel, calibration: list[Example], *, batch_size: int, pad_id: int,
           progress: bool) -> WeightScores:
    """``|W_ij| · ‖X_j‖₂`` for linear weights (Sun et al., 2024); other parameters are not scored."""
    norms = _input_norms(model, calibration, batch_size=batch_size, pad_id=pad_id, progress=progress)
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    out = {}
    for name, p in model.named_parameters():
        if name in norms:
            # nn.Linear stores [d_out, d_in], Conv1D [d_in, d_out]: broadcast the norm along the input axis.
            norm = norms[name][:, None] if name.rpartition(".")[0] in conv else norms[name][None, :]
            out[name] = p.detach().float().abs() * norm
    return out


def wanda_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    """Wanda scores of the linear weights (float32, their shape), calibrated on ``inputs``' calibration set, else
    its retain set."""
    if inputs.calibration is None and inputs.retain is None:
        raise PatchlabValueError("wanda needs a calibration set (calibration=... or retain=...)")
    calibration = inputs.examples("calibration" if inputs.calibration is not None else "retain")
    return _wanda(model, calibration, batch_size=inputs.batch_size, pad_id=inputs.pad_id, progress=inputs.progress)


SCORER = wanda_scores
