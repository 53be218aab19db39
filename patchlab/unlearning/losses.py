"""Building blocks of the unlearning objectives (the objectives themselves live in
:mod:`patchlab.unlearning.methods`, one file per method).

Notation: ``f`` a forget sequence, ``r`` a retain sequence, ``log p(y|x)`` the summed log-probability of a
sequence's target tokens (labels != -100), ``NLL`` the mean negative log-likelihood per target token (nats).
Every objective is *minimised*.

An objective sees one micro-batch as a :class:`Step`: the trained model, the forget / retain / preferred batches,
the frozen :class:`Reference`, and the reductions :meth:`Step.token_mean` and :meth:`Step.seq_mean`, which average
over the *global* batch: when several processes each hold a share of it, their losses add up (after the data-parallel
gradient average) to the one-process objective, whatever the sizes of the shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import nn
from transformers import PreTrainedModel

from patchlab.errors import PatchlabValueError
from patchlab.pair.arch import arch_spec
from patchlab.pair.sites import StopForward, hook, recording
from patchlab.unlearning.data import IGNORE

Batch = dict[str, torch.Tensor]

#: Key of a batch's precomputed reference sequence log-probabilities (``[batch]``, see :class:`Reference`).
REF_LOGPROB = "ref_logprob"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    device = _device(model)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def target_mask(batch: Batch, device: torch.device | None = None) -> Bool[torch.Tensor, "batch seq_1"]:
    """Where the next token is a training target: ``labels[:, 1:] != -100``, ``[batch, seq-1]``."""
    labels = batch["labels"] if device is None else batch["labels"].to(device)
    return labels[:, 1:] != IGNORE


def next_token_logprobs(model: nn.Module, batch: Batch) -> Float[torch.Tensor, "batch seq_1 vocab"]:
    """``log_softmax`` of the logits that predict tokens ``1..seq-1``, in float32, ``[batch, seq-1, vocab]``."""
    return torch.log_softmax(model(**_inputs(model, batch)).logits[:, :-1].float(), dim=-1)


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[Float[torch.Tensor, "batch seq_1"], torch.Tensor]:
    """Log-probability (float32, nats) of every next token, zero outside targets, and the mask of target
    positions (:func:`target_mask`), both ``[batch, seq-1]``."""
    logp = next_token_logprobs(model, batch)
    labels = batch["labels"].to(logp.device)[:, 1:]
    mask = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return picked * mask, mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> Float[torch.Tensor, ""]:
    """``sum(values) / count(mask)`` (``values`` already zero outside ``mask``; an empty mask counts as 1)."""
    return values.sum() / mask.sum().clamp(min=1)


def sequence_logprob(model: nn.Module, batch: Batch) -> Float[torch.Tensor, "batch"]:
    """``log p(y|x)`` per sequence: the sum of its target tokens' log-probabilities (padding excluded)."""
    picked, _ = token_logprobs(model, batch)
    return picked.sum(dim=1)


def nll(model: nn.Module, batch: Batch) -> Float[torch.Tensor, ""]:
    """Mean negative log-likelihood per target token over the batch (nats)."""
    return -masked_mean(*token_logprobs(model, batch))


def sequence_token_nll(model: nn.Module, batch: Batch) -> Float[torch.Tensor, "batch"]:
    """Each sequence's mean NLL per target token (nats), ``[batch]`` (a sequence without targets gives 0)."""
    picked, mask = token_logprobs(model, batch)
    return -picked.sum(1) / mask.sum(1).clamp(min=1)


def sequence_nll(model: nn.Module, batch: Batch) -> Float[torch.Tensor, ""]:
    """Mean over the batch's sequences of :func:`sequence_token_nll` (nats per token).

    Unlike :func:`nll`, batches weighted by their number of sequences average exactly to the full-data value,
    whatever the batching (used by :mod:`patchlab.unlearning.attribution`).
    """
    return sequence_token_nll(model, batch).mean()


def _layer_module(base: PreTrainedModel, layer: int) -> nn.Module:
    """Decoder layer ``layer`` of ``base``; raises :class:`PatchlabValueError` unless it is a layer index."""
    layers = arch_spec(base).layer_modules(base)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise PatchlabValueError(f"layer must lie in 0..{len(layers) - 1}, got {layer!r}")
    return layers[layer]


def layer_output(model: nn.Module, base: PreTrainedModel, layer: int, batch: Batch
                 ) -> Float[torch.Tensor, "batch seq d_model"]:
    """The output of decoder layer ``layer`` (the residual stream after it) when ``model`` runs on ``batch``.

    Recorded by :func:`patchlab.pair.sites.recording` on ``arch_spec(base).layer_modules(base)[layer]`` (the
    first element when the layer returns a tuple), whose hook is removed right after the forward pass, so a
    gradient-checkpointing recomputation does not fire it again. ``model`` is what is called (the trained model
    as wrapped by DDP or peft, or a frozen reference); ``base`` is the underlying ``transformers`` model that
    locates the layer. The whole model runs, and gradients flow unless the caller disables them.
    """
    with recording([_layer_module(base, layer)], "output") as seen:
        model(**_inputs(base, batch))
    return seen[0]


def _frozen_layer_output(model: nn.Module, base: PreTrainedModel, layer: int, batch: Batch
                         ) -> Float[torch.Tensor, "batch seq d_model"]:
    """:func:`layer_output` for a frozen model run without gradients: the same tensor, but the forward pass stops
    right after ``layer`` (:class:`patchlab.pair.sites.StopForward`), so the layers above and the unembedding
    never run. Not for a trained model (a DDP-wrapped forward must complete)."""
    seen: list[torch.Tensor] = []

    def stop(hidden: torch.Tensor) -> None:
        seen.append(hidden)
        raise StopForward

    with hook(_layer_module(base, layer), "output", stop), contextlib.suppress(StopForward):
        model(**_inputs(base, batch))
    return seen[0]


class Reference:
    """The frozen starting model, as the objectives see it.

    Two sources, used in this order:

    * **precomputed** sequence log-probabilities: a batch may carry ``batch["ref_logprob"]`` (``[batch]``,
      on the training device), filled by the trainer before training (``reference="precompute"``), after which
      the reference model need not exist at all;
    * a **held** frozen model (``model``, on its own device; ``None`` when everything is precomputed), run under
      ``torch.no_grad()`` inside ``context()`` (e.g. peft's ``disable_adapter`` when the reference is the base
      of a LoRA-trained model). Its outputs are moved to ``out_device``, the training device.

    Args:
        model: the held reference or ``None``. base: the ``transformers`` model that locates its layers
            (default ``model``). out_device: where results go. context: entered around every reference forward.
    """

    def __init__(self, model: nn.Module | None, *, out_device: torch.device | str,
                 base: PreTrainedModel | None = None,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.model = model
        self.base = base if base is not None else model
        self.out_device = torch.device(out_device)
        self._context = context

    def _held(self, what: str) -> nn.Module:
        if self.model is None:
            raise PatchlabValueError(f"the objective asks for the reference {what}, but no reference model was "
                                     "kept: the method must declare Needs(reference='model')")
        return self.model

    @contextlib.contextmanager
    def _run(self, what: str):
        model = self._held(what)
        with torch.no_grad(), self._context():
            yield model

    def sequence_logprob(self, batch: Batch) -> Float[torch.Tensor, "batch"]:
        """``log p_ref(y|x)`` per sequence: the precomputed value when the batch carries one, else computed."""
        if REF_LOGPROB in batch:
            return batch[REF_LOGPROB].to(self.out_device)
        with self._run("sequence log-probability") as model:
            return sequence_logprob(model, batch).to(self.out_device)

    def next_token_logprobs(self, batch: Batch) -> Float[torch.Tensor, "batch seq_1 vocab"]:
        """The reference's :func:`next_token_logprobs` (float32), on the training device."""
        with self._run("logits") as model:
            return next_token_logprobs(model, batch).to(self.out_device)

    def layer_output(self, layer: int, batch: Batch) -> Float[torch.Tensor, "batch seq d_model"]:
        """The reference's :func:`layer_output` of ``layer``, on the training device; its forward pass stops after
        that layer."""
        with self._run("activations") as model:
            return _frozen_layer_output(model, self.base, layer, batch).to(self.out_device)


@dataclass
class Step:
    """One micro-batch as an objective sees it.

    Attributes:
        model: the trained model as it is called (possibly wrapped by DDP or peft).
        base: the underlying ``transformers`` model (locate modules with ``arch_spec(step.base)``).
        forget: the forget batch (``input_ids``, ``attention_mask``, ``labels``, each ``[batch, seq]``).
        retain: a retain batch, or ``None`` when the method needs no retain set.
        chosen: the preferred answers paired row by row with ``forget`` (DPO's refusals), or ``None``.
        reference: the frozen starting model (:class:`Reference`), or ``None`` when the method needs none.
        state: what the method's ``setup`` returned for this run (e.g. RMU's random control vector), or ``None``.
        n_processes: processes sharing the global batch.
        all_sum: sums a scalar tensor over the processes (identity with one process).
    """

    model: nn.Module
    base: PreTrainedModel
    forget: Batch
    retain: Batch | None = None
    chosen: Batch | None = None
    reference: Reference | None = None
    state: Any = None
    n_processes: int = 1
    all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda count: count

    def _share(self, count: torch.Tensor) -> float:
        """``n_processes * count / (count summed over processes)``: 1.0 exactly with one process."""
        if self.n_processes == 1:
            return 1.0
        total = self.all_sum(count.detach().to(torch.float64))
        return self.n_processes * float(count) / max(float(total), 1.0)

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> Float[torch.Tensor, ""]:
        """Mean of ``values`` over the ``True`` entries of ``mask`` of the global batch (``values`` zero
        elsewhere), scaled so that the data-parallel average of the processes' gradients is the gradient of the
        global mean. With one process: exactly :func:`masked_mean`."""
        return masked_mean(values, mask) * self._share(mask.sum())

    def seq_mean(self, values: Float[torch.Tensor, "batch"]) -> Float[torch.Tensor, ""]:
        """Mean of per-sequence ``values`` over the global batch (see :meth:`token_mean`)."""
        return values.mean() * self._share(torch.tensor(values.numel()))

    def nll(self, batch: Batch) -> Float[torch.Tensor, ""]:
        """NLL per target token of ``batch`` under the trained model (nats), averaged over the global batch."""
        return -self.token_mean(*token_logprobs(self.model, batch))

    def log_ratio(self, batch: Batch) -> Float[torch.Tensor, "batch"]:
        """``log p_θ(y|x) - log p_ref(y|x)`` per sequence of ``batch`` (nats), on the training device."""
        return sequence_logprob(self.model, batch) - self.reference.sequence_logprob(batch)
