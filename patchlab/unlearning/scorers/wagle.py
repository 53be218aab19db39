"""WAGLE (Jia et al., NeurIPS 2024): ``S = (θ - ∇ℓ_r(θ) / γ) ⊙ ∇ℓ_f(θ)`` per weight, with ``ℓ_f`` the
forget loss (signed by the ``forget_loss`` convention), ``ℓ_r`` the retain loss and ``γ > 0`` the
Hessian-diagonal parameter."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.unlearning.data import Example, batches
from patchlab.unlearning.scorers import LossFn, ScoreInputs, WeightScores


@contextlib.contextmanager
def _gradient_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) with gradients on every parameter; restores mode, flags and ``.grad`` afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag, grad in zip(model.parameters(), flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def _accumulate_gradients(model: PreTrainedModel, examples: list[Example], loss: LossFn, *, batch_size: int,
                          reduction: str, pad_id: int, desc: str, progress: bool) -> None:
    """Leave ``∇ℓ(θ)`` in every ``p.grad``, with ``ℓ = Σ_b w_b · loss(θ, batch_b)`` over batches of ``n_b`` of the
    ``N`` sequences: ``w_b = n_b / N`` (``reduction="mean"``: the mean of the batch losses weighted by batch size)
    or ``w_b = 1`` (``"sum"``). One batch in memory at a time; gradients accumulate in ``.grad`` batch by batch."""
    for p in model.parameters():
        p.grad = None
    n_batches = math.ceil(len(examples) / batch_size)
    for batch in tqdm(batches(examples, batch_size, pad_id=pad_id), total=n_batches, desc=desc, disable=not progress):
        value = loss(model, batch)
        if not torch.isfinite(value):
            raise NonFiniteError(f"the {desc} loss is {value.item()} on a batch")
        (value * (batch["input_ids"].shape[0] / len(examples)) if reduction == "mean" else value).backward()


def _wagle(model: PreTrainedModel, forget: list[Example], retain: list[Example], *, gamma: float, loss: LossFn,
           forget_sign: float, batch_size: int, reduction: str, pad_id: int, progress: bool) -> WeightScores:
    """WAGLE scores with ``ℓ_f = forget_sign · loss`` on ``forget``; peak memory: the model, its gradients and
    one stored gradient (3x the model)."""
    params = dict(model.named_parameters())
    grads = {"batch_size": batch_size, "reduction": reduction, "pad_id": pad_id, "progress": progress}
    with _gradient_mode(model):
        _accumulate_gradients(model, forget, loss, desc="forget gradient", **grads)
        grad_f = {}
        for name, p in params.items():
            grad_f[name] = p.grad.float().mul_(forget_sign) if p.grad is not None \
                else torch.zeros_like(p, dtype=torch.float32)
            p.grad = None
        _accumulate_gradients(model, retain, loss, desc="retain gradient", **grads)
        out = {}
        for name, p in params.items():
            g_r = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            p.grad = None
            out[name] = g_r.div_(-gamma).add_(p.detach().float()).mul_(grad_f.pop(name))
    return out


def wagle_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    """WAGLE scores of every parameter (float32, its shape) from ``inputs``' forget and retain sets."""
    if inputs.forget is None or inputs.retain is None:
        raise PatchlabValueError("wagle needs both a forget and a retain set")
    if not inputs.gamma > 0:
        raise PatchlabValueError(f"gamma must be > 0, got {inputs.gamma}")
    return _wagle(model, inputs.examples("forget"), inputs.examples("retain"), gamma=inputs.gamma, loss=inputs.loss,
                  forget_sign=inputs.forget_sign, batch_size=inputs.batch_size, reduction=inputs.reduction,
                  pad_id=inputs.pad_id, progress=inputs.progress)


SCORER = wagle_scores
