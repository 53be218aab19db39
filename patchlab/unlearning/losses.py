"""Unlearning objectives, each a small function of the model, the frozen reference and the batches.

Notation: ``f`` a forget sequence, ``r`` a retain sequence, ``log p(y|x)`` the summed log-probability of a
sequence's target tokens (labels != -100), ``NLL`` the mean negative log-likelihood per target token, ``β`` the
inverse temperature. Every objective is *minimised*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformers import PreTrainedModel

from patchlab.unlearning.data import IGNORE

Batch = dict[str, torch.Tensor]


def token_logprobs(model: PreTrainedModel, batch: Batch) -> tuple[Float[torch.Tensor, "batch seq"], torch.Tensor]:
    """Log-probability of every next token and the mask of target positions, both ``[batch, seq-1]``."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return picked * mask, mask


def sequence_logprob(model: PreTrainedModel, batch: Batch) -> Float[torch.Tensor, "batch"]:
    """``log p(y|x)`` per sequence: the sum of its target tokens' log-probabilities (padding excluded)."""
    picked, _ = token_logprobs(model, batch)
    return picked.sum(dim=1)


def nll(model: PreTrainedModel, batch: Batch) -> Float[torch.Tensor, ""]:
    """Mean negative log-likelihood per target token over the batch (nats)."""
    picked, mask = token_logprobs(model, batch)
    return -picked.sum() / mask.sum().clamp(min=1)


def sequence_nll(model: PreTrainedModel, batch: Batch) -> Float[torch.Tensor, ""]:
    """Mean over the batch's sequences of each sequence's mean NLL per target token (nats).

    Unlike :func:`nll`, batches weighted by their number of sequences average exactly to the full-data value,
    whatever the batching (used by :mod:`patchlab.unlearning.attribution`).
    """
    picked, mask = token_logprobs(model, batch)
    return (-picked.sum(1) / mask.sum(1).clamp(min=1)).mean()


def kl_to_reference(model: PreTrainedModel, ref: PreTrainedModel, batch: Batch) -> Float[torch.Tensor, ""]:
    """Mean over target positions of ``KL(p_ref || p_θ)`` of the next-token distributions (nats)."""
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    mask = (batch["labels"].to(device)[:, 1:] != IGNORE)
    logp = torch.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax(ref(**inputs).logits[:, :-1].float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _ref_logprob(ref: PreTrainedModel, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprob(ref, batch)


def ga(model, ref, forget: Batch, retain: Batch | None, *, beta, retain_weight, kl_weight, **_) -> torch.Tensor:
    """Gradient ascent: ``L = -NLL(f)``."""
    return -nll(model, forget)


def graddiff(model, ref, forget: Batch, retain: Batch, *, beta, retain_weight, kl_weight, **_) -> torch.Tensor:
    """Gradient difference: ``L = -NLL(f) + retain_weight * NLL(r)``."""
    return -nll(model, forget) + retain_weight * nll(model, retain)


def npo(model, ref, forget: Batch, retain: Batch | None, *, beta, retain_weight, kl_weight, **_) -> torch.Tensor:
    """Negative preference optimisation: ``L = -(2/β) mean log σ(-β (log p_θ(f) - log p_ref(f)))``."""
    ratio = sequence_logprob(model, forget) - _ref_logprob(ref, forget)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def npo_kl(model, ref, forget: Batch, retain: Batch, *, beta, retain_weight, kl_weight, **_) -> torch.Tensor:
    """NPO plus a retain KL term: ``L = NPO(f) + kl_weight * KL(p_ref || p_θ)`` on retain target tokens."""
    return npo(model, ref, forget, retain, beta=beta, retain_weight=retain_weight, kl_weight=kl_weight) \
        + kl_weight * kl_to_reference(model, ref, retain)


def dpo(model, ref, forget: Batch, retain: Batch | None, *, beta, retain_weight, kl_weight, chosen: Batch,
        **_) -> torch.Tensor:
    """DPO with a refusal as the preferred answer ``w`` and the forget answer as the rejected one ``l``:
    ``L = -mean log σ(β [(log p_θ(w) - log p_ref(w)) - (log p_θ(l) - log p_ref(l))])``."""
    margin = (sequence_logprob(model, chosen) - _ref_logprob(ref, chosen)) \
        - (sequence_logprob(model, forget) - _ref_logprob(ref, forget))
    return -F.logsigmoid(beta * margin).mean()


LossFn = Callable[..., torch.Tensor]

#: method name -> (objective, needs retain data, needs the frozen reference model)
METHODS: dict[str, tuple[LossFn, bool, bool]] = {
    "ga": (ga, False, False),
    "graddiff": (graddiff, True, False),
    "npo": (npo, False, True),
    "npo_kl": (npo_kl, True, True),
    "dpo": (dpo, False, True),
}
