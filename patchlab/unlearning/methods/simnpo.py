"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning"): NPO without the reference model, on the length-normalised sequence log-probability, with a margin::

    L = -(2/β) mean_f log σ(β (NLL_tok(f) - γ)) + retain_weight * NLL(r)

where ``NLL_tok(f) = -log p_θ(y|x) / |y|`` is the forget sequence's mean NLL per target token (nats) and ``|y|``
its number of target tokens.

Follows the authors' code (OPTML-Group/Unlearn-Simple, ``TOFU/dataloader.py``, loss types ``simnpo`` and
``simnpo_grad_diff``) and open-unlearning's ``SimNPO`` trainer: the margin is subtracted *inside* the β-scaling,
so the paper's ``γ`` (written as ``σ(-β/|y| log p - γ)``) is ``β·gamma`` here. The authors weight the forget
term by ``npo_coeff`` (0.1375 on TOFU, with the retain term at 1); under Adam only the ratio of the two weights
matters, so here the forget term has weight 1 and their setting is ``retain_weight = 1 / npo_coeff``. The retain
term is optional (``retain_weight = 0``, the default, needs no retain set). No reference model is used at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.unlearning.methods import Method, Needs, lr_sweep, require_non_negative, require_positive

if TYPE_CHECKING:
    import torch

    from patchlab.unlearning.losses import Step


@dataclass(frozen=True)
class Settings:
    """Settings of SimNPO.

    Attributes:
        beta: inverse temperature β (per nat of mean NLL per token); the authors use 2.5 on TOFU.
        gamma: margin γ (nats per token) subtracted from the forget sequence's mean NLL per token; the authors' 0.
        retain_weight: weight of the optional retain NLL (nats per token) against the SimNPO term
            (dimensionless); 0 = no retain term and no retain set needed.
    """

    beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 0.0

    def __post_init__(self) -> None:
        require_positive(self, "beta")
        require_non_negative(self, "gamma", "retain_weight")


def forget_term(step: Step, s: Settings) -> torch.Tensor:
    """``-(2/β) mean log σ(β (NLL_tok(f) - γ))`` over the forget batch."""
    import torch.nn.functional as F

    from patchlab.unlearning.losses import sequence_token_nll

    nll_tok = sequence_token_nll(step.model, step.forget)
    return -(2.0 / s.beta) * step.seq_mean(F.logsigmoid(s.beta * (nll_tok - s.gamma)))


def loss(step: Step, s: Settings) -> torch.Tensor:
    """SimNPO's objective (module docstring)."""
    value = forget_term(step, s)
    return value + s.retain_weight * step.nll(step.retain) if s.retain_weight > 0 else value


METHOD = Method(name="simnpo", kind="finetune", settings=Settings,
                summary="−(2/β)·mean log σ(β·(NLL_tok(forget) − γ)) + retain_weight·NLL(retain), no reference",
                loss=loss, needs=lambda s: Needs(retain=s.retain_weight > 0),
                sweep=lr_sweep(7e-4, 1e-3, 1.5e-3))
