"""RMU, representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark"): on forget data, push
the output of one decoder layer (the residual stream after it, ``h``) towards a fixed random direction ``u``
scaled by the steering coefficient ``c``; on retain data, keep it equal to the frozen model's ``h_ref``::

    L = mean_{f, t, d} (h_f - c·u)^2 + alpha * mean_{r, t, d} (h_r - h_ref,r)^2

where the means run over sequences, their non-padding positions ``t`` and the ``d_model`` coordinates. Only the
MLP down-projection weights of ``update_layers`` are trained.

Follows the authors' code (centerforaisafety/wmdp, ``rmu/unlearn.py``, also open-unlearning's ``RMU`` trainer):
``u`` is uniform in ``[0, 1)^d`` normalised to unit length and drawn once (from ``seed``); the steered layer is
``layer`` and the trained weights are the down projections of ``layer-2 .. layer`` (their ``layer_ids 5,6,7``,
``param_ids 6`` on a 32-layer model with ``layer_id 7``); defaults ``steering_coeff 20``, ``alpha 100``.
Differences: padding positions are excluded from both means (the authors' left-padded batches include them), the
squared errors are taken in float32, one forget and one retain batch make a step as for every patchlab method
(the authors draw them in lock-step too), and the default layer on other depths is ``round(7/32 · n_layers)``.
With ``lora=`` the adapter's target modules decide what is trained instead of ``update_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchlab.errors import PatchlabValueError
from patchlab.unlearning.methods import Method, Needs, freeze_sequence, require_non_negative, require_positive

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float
    from transformers import PreTrainedModel

    from patchlab.unlearning.losses import Batch, Step


@dataclass(frozen=True)
class Settings:
    """Settings of RMU.

    Attributes:
        layer: index of the decoder layer whose output is steered; ``None`` = ``round(7/32 · n_layers)``
            (the authors' layer 7 of 32).
        update_layers: layers whose MLP down-projection weights are trained; ``None`` = ``layer-2 .. layer``.
        steering_coeff: norm ``c`` of the control vector (units of the residual stream).
        alpha: weight of the retain activation MSE against the forget one (dimensionless).
    """

    layer: int | None = None
    update_layers: tuple[int, ...] | None = None
    steering_coeff: float = 20.0
    alpha: float = 100.0

    def __post_init__(self) -> None:
        require_positive(self, "steering_coeff")
        require_non_negative(self, "alpha")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise PatchlabValueError(f"layer must be a layer index, got {self.layer!r}")
        freeze_sequence(self, "update_layers", int, optional=True)


@dataclass(frozen=True)
class Control:
    """RMU's per-run state: the steered layer and the control vector ``c·u`` (``[d_model]``, float32)."""

    layer: int
    vector: Float[torch.Tensor, "d_model"]


def layers(model: PreTrainedModel, s: Settings) -> tuple[int, list[int]]:
    """(steered layer, trained layers) of ``model`` under ``s``, checked against its depth."""
    from patchlab.pair.arch import arch_spec

    n = len(arch_spec(model).layer_modules(model))
    layer = round(7 * n / 32) if s.layer is None else s.layer
    update = list(range(max(0, layer - 2), layer + 1)) if s.update_layers is None else sorted(set(s.update_layers))
    bad = [i for i in [layer, *update] if not 0 <= i < n]
    if bad or not update:
        raise PatchlabValueError(f"RMU layers must lie in 0..{n - 1} for this {n}-layer model "
                                 f"(layer {layer}, update_layers {update})")
    return layer, update


def setup(model: PreTrainedModel, s: Settings, seed: int) -> Control:
    """Draw the unit direction ``u`` (uniform in ``[0, 1)^d``, normalised) from ``seed``; scale it by ``c``."""
    import torch

    layer, _ = layers(model, s)
    u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return Control(layer=layer, vector=s.steering_coeff * u / u.norm())


def trainable(model: PreTrainedModel, s: Settings) -> list[str]:
    """Names of the down-projection weights of the trained layers."""
    from patchlab.pair.arch import arch_spec

    spec = arch_spec(model)
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(spec.down_proj(model, i).weight)] for i in layers(model, s)[1]]


def _position_mse(h: torch.Tensor, target: torch.Tensor, batch: Batch, step: Step) -> torch.Tensor:
    """Mean over the global batch's non-padding positions of ``mean_d (h - target)^2``."""
    mask = batch["attention_mask"].to(h.device).bool()
    return step.token_mean(((h.float() - target.float()) ** 2).mean(-1) * mask, mask)


def loss(step: Step, s: Settings) -> torch.Tensor:
    """RMU's objective (module docstring)."""
    from patchlab.unlearning.losses import layer_output

    layer, control = step.state.layer, step.state.vector
    h_f = layer_output(step.model, step.base, layer, step.forget)
    forget = _position_mse(h_f, control.to(h_f.device), step.forget, step)
    h_r = layer_output(step.model, step.base, layer, step.retain)
    retain = _position_mse(h_r, step.reference.layer_output(layer, step.retain), step.retain, step)
    return forget + s.alpha * retain


#: On the toy world (residual norms 36-87 after layers 0-5 of d_model 128) the authors' c = 20 barely moves the
#: steered layer: the method sweep steers with c = 100 at alpha = 10 and varies the learning rate (the toy world's
#: own rmu settings, in :mod:`patchlab.toy.cache`, are these at lr 5e-3 for 3 epochs).
TOY = {"steering_coeff": 100.0, "alpha": 10.0, "epochs": 2, "batch_size": 8}

METHOD = Method(name="rmu", kind="finetune", settings=Settings,
                summary="mean (h_f − c·u)² + alpha·mean (h_r − h_ref)² at one layer's output; "
                        "a few layers' MLP down projections trained",
                loss=loss, setup=setup, trainable=trainable, needs=Needs(retain=True, reference="model"),
                sweep=tuple(TOY | {"lr": lr} for lr in (4e-3, 5e-3, 1e-2)))
