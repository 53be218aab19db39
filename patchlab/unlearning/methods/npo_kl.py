"""NPO plus a retain KL term: ``L = NPO(f) + kl_weight * KL(p_ref || p_θ)``, the KL averaged over retain target
tokens.

The KL term needs the reference's full next-token distributions on every retain batch, so the frozen reference
model is kept during training (on the device of :class:`patchlab.unlearning.ReferenceSettings`); the NPO term's
forget log-probabilities are still precomputed by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.unlearning.methods import Method, Needs, lr_sweep, require_non_negative, require_positive
from patchlab.unlearning.methods.npo import forget_term

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """Settings of NPO+KL.

    Attributes:
        beta: inverse temperature β of the NPO term (per nat of sequence log-probability ratio).
        kl_weight: weight of the retain KL (nats per token) against the NPO term (dimensionless).
    """

    beta: float = 0.1
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        require_positive(self, "beta")
        require_non_negative(self, "kl_weight")


def kl_term(step: Step) -> torch.Tensor:
    """Mean over retain target positions of ``KL(p_ref || p_θ)`` of the next-token distributions (nats)."""
    from patchlab.unlearning.losses import next_token_logprobs, target_mask

    logp = next_token_logprobs(step.model, step.retain)
    logq = step.reference.next_token_logprobs(step.retain)
    mask = target_mask(step.retain, logp.device)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return step.token_mean(kl * mask, mask)


def loss(step: Step, s: Settings) -> torch.Tensor:
    """NPO+KL's objective (module docstring)."""
    return forget_term(step, s.beta) + s.kl_weight * kl_term(step)


METHOD = Method(name="npo_kl", kind="finetune", settings=Settings,
                summary="NPO + kl_weight·KL(p_ref ‖ p_θ) on retain tokens", loss=loss,
                needs=Needs(retain=True, reference="model"), sweep=lr_sweep(7e-4, 1e-3, 2e-3))
