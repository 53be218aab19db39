"""Recovery metrics as data: how much of the source model's behaviour a restoration brings back.

A metric is a function of the restored logits and the references of one question, returning one score per row::

    def my_metric(restored: Float[Tensor, "row answer vocab"], refs: References) -> Float[Tensor, "row"]: ...
    patchlab.register_metric("my_metric", my_metric)
    patchlab.patch_sweep(pair, questions, metric="my_metric")      # or metric=my_metric

``restored`` are the patched model's raw logits at the ``A`` positions that predict the answer tokens, in the
model's dtype; every row belongs to the same question. ``refs`` holds the same positions' logits of the *source*
model (whose activations are restored: the vanilla model in a KRS sweep) and of the *target* model (the patched
one: the unlearned model), in float32, and the answer ids (the source model's greedy answer). Built-in metrics
compute in float32 in chunks over the vocabulary, never materialising a ``[row, answer, vocab]`` float32 copy.

Built-ins (``t`` the answer positions, ``l_s``, ``l_t``, ``l_r`` source, target and restored logits):

* ``krs`` - ``1 - MSE(l_r, l_s) / MSE(l_t, l_s)`` (Hong et al., Eq. 3), MSE over positions and vocabulary;
* ``logprob`` - the recovered fraction of the answer's log-probability gap, ``(lp_r - lp_t) / (lp_s - lp_t)``
  with ``lp`` the mean over ``t`` of ``log p(a_t)`` (nats);
* ``kl`` - the recovered fraction of the divergence, ``1 - KL(p_s || p_r) / KL(p_s || p_t)``, KL averaged over ``t``;
* ``top1`` - the fraction of positions where the restored model's top token is the answer token (0..1);
* ``answer_logprob`` - the restored model's mean ``log p(a_t)`` itself (nats), no reference (UDS patches with it).

The first three are 0 for the target's own logits and 1 for the source's; their per-question denominators weight
the pooled aggregate (:func:`pool`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from patchlab.errors import DegenerateKRSError, DegenerateMetricError, NonFiniteError, PatchlabValueError
from patchlab.registry import Registry

#: Vocabulary entries per float32 chunk.
VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class References:
    """What a metric compares restored logits with, for one question.

    Attributes:
        source: ``[answer, vocab]`` float32 logits of the source model (the vanilla model in a KRS sweep).
        target: ``[answer, vocab]`` float32 logits of the unpatched target model (the unlearned model).
        answer_ids: ``[answer]`` the answer tokens (the source model's greedy answer).
    """

    source: Float[torch.Tensor, "answer vocab"]
    target: Float[torch.Tensor, "answer vocab"]
    answer_ids: Int[torch.Tensor, "answer"]

    @property
    def vanilla(self) -> Float[torch.Tensor, "answer vocab"]:
        """``source``, under its name in a KRS sweep."""
        return self.source

    @property
    def unlearned(self) -> Float[torch.Tensor, "answer vocab"]:
        """``target``, under its name in a KRS sweep."""
        return self.target

    def to(self, device: torch.device) -> References:
        return References(self.source.to(device), self.target.to(device), self.answer_ids.to(device))


MetricFn = Callable[[torch.Tensor, References], torch.Tensor]


def _chunks(vocab: int) -> range:
    return range(0, vocab, VOCAB_CHUNK)


def mse(restored: Float[torch.Tensor, "row answer vocab"], reference: Float[torch.Tensor, "answer vocab"]
        ) -> Float[torch.Tensor, "row"]:
    """Mean squared difference over positions and vocabulary, per row, in float32 (chunked over the vocabulary)."""
    total = torch.zeros(restored.shape[0], dtype=torch.float32, device=restored.device)
    for c in _chunks(restored.shape[-1]):
        diff = restored[..., c:c + VOCAB_CHUNK].float() - reference[..., c:c + VOCAB_CHUNK].to(restored.device)
        total += diff.pow(2).sum(dim=(-2, -1))
    return total / (restored.shape[-2] * restored.shape[-1])


def logsumexp(logits: Float[torch.Tensor, "*batch vocab"]) -> Float[torch.Tensor, "*batch"]:
    """``log Σ_v exp(logits_v)`` in float32, in chunks over the vocabulary (running maximum, so it never overflows)."""
    peak = logits.amax(dim=-1).float()
    total = torch.zeros_like(peak)
    for c in _chunks(logits.shape[-1]):
        total += (logits[..., c:c + VOCAB_CHUNK].float() - peak[..., None]).exp().sum(-1)
    return peak + total.log()


def answer_logprob(logits: Float[torch.Tensor, "*batch answer vocab"], answer_ids: Int[torch.Tensor, "answer"]
                   ) -> Float[torch.Tensor, "*batch"]:
    """Mean over answer positions of ``log p(a_t)`` (nats), float32."""
    index = answer_ids.to(logits.device).expand(*logits.shape[:-1])[..., None]
    picked = logits.gather(-1, index)[..., 0].float()
    return (picked - logsumexp(logits)).mean(-1)


def kl_from(source: Float[torch.Tensor, "answer vocab"], logits: Float[torch.Tensor, "*batch answer vocab"]
            ) -> Float[torch.Tensor, "*batch"]:
    """Mean over positions of ``KL(p_source || p_logits)`` (nats), float32, chunked over the vocabulary.

    ``KL = Σ_v p_s,v (log p_s,v - l_v + lse(l))``: the log-sum-exp of the restored logits first, then the sum of
    per-entry differences (which vanish entry by entry when the distributions agree, so a restored model equal to
    the source scores exactly 0, with no cancellation of large sums).
    """
    source = source.to(logits.device)
    log_ps = source - logsumexp(source)[..., None]
    lse = logsumexp(logits)[..., None]
    total = torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for c in _chunks(logits.shape[-1]):
        part = log_ps[..., c:c + VOCAB_CHUNK]
        total += (part.exp() * (part - logits[..., c:c + VOCAB_CHUNK].float() + lse)).sum(-1)
    return total.mean(-1)


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: its registry name.
        fn: ``fn(restored, refs) -> [row]`` scores.
        description: one line for tables, figures and reports.
        denominator: ``denominator(refs) -> float`` for recovery metrics of the form ``1 - num / den``: the
            per-question weight of the pooled aggregate; it raises :class:`DegenerateMetricError` when the source
            and target agree so the score is undefined. ``None``: no pooled form.
    """

    name: str
    fn: MetricFn
    description: str
    denominator: Callable[[References], float] | None = None

    def __call__(self, restored: torch.Tensor, refs: References) -> Float[torch.Tensor, "row"]:
        """Scores of ``restored`` ``[row, answer, vocab]`` (or ``[answer, vocab]``, one row) against ``refs``."""
        if restored.ndim == 2:
            restored = restored[None]
        if restored.ndim != 3 or restored.shape[1:] != refs.source.shape:
            raise PatchlabValueError(f"metric {self.name!r}: restored logits {tuple(restored.shape)} do not match the "
                                     f"references {tuple(refs.source.shape)}")
        scores = self.fn(restored, refs)
        if not isinstance(scores, torch.Tensor) or scores.shape != (restored.shape[0],):
            raise PatchlabValueError(f"metric {self.name!r} must return one score per row, a tensor of shape "
                                     f"({restored.shape[0]},), got {getattr(scores, 'shape', type(scores))}")
        return scores.float()

    def check(self, refs: References, label: str) -> float | None:
        """Validate one question's references: the metric is finite on the target's and source's own logits;
        returns the pooling weight (``None`` without a pooled form).

        Raises:
            DegenerateMetricError: the score is undefined for this question (e.g. the models agree).
            NonFiniteError: the metric gives NaN or infinity.
        """
        weight = None
        if self.denominator is not None:
            try:
                weight = float(self.denominator(refs))
            except DegenerateMetricError as err:
                raise type(err)(f"{label}: {err}") from None
        for who, logits in (("target", refs.target), ("source", refs.source)):
            if not torch.isfinite(self(logits, refs)).all():
                raise NonFiniteError(f"{label}: metric {self.name!r} is not finite on the {who} model's own logits")
        return weight


def pool(per_question: Any, weights: Any) -> Any:
    """``1 - Σ_q w_q (1 - s_q) / Σ_q w_q`` over the first axis of ``per_question`` (numpy arrays, ``weights`` the
    per-question denominators of a ``1 - num / den`` metric): the ratio of question-summed numerators and
    denominators (Hong et al.'s Eq. 3 read literally, for ``krs``)."""
    w = weights.reshape(-1, *([1] * (per_question.ndim - 1)))
    return 1.0 - ((1.0 - per_question) * w).sum(axis=0) / w.sum()


def _mse_denominator(refs: References) -> float:
    value = float(mse(refs.target[None], refs.source)[0])
    if value <= torch.finfo(torch.float32).eps * float(refs.source.pow(2).mean()):
        raise DegenerateKRSError(
            f"the unlearned model's logits equal the vanilla model's (MSE(l_u, l_v) = {value:.3g}); KRS is undefined. "
            "Is the unlearned checkpoint really different?")
    return value


def _krs(restored: torch.Tensor, refs: References) -> torch.Tensor:
    return 1.0 - mse(restored, refs.source) / mse(refs.target[None], refs.source)


def _logprob_denominator(refs: References) -> float:
    gap = float(answer_logprob(refs.source, refs.answer_ids) - answer_logprob(refs.target, refs.answer_ids))
    if abs(gap) < 1e-6:
        raise DegenerateMetricError(f"the answer's log-probability is the same under both models (gap {gap:.3g} "
                                    "nats); its recovered fraction is undefined")
    return gap


def _logprob(restored: torch.Tensor, refs: References) -> torch.Tensor:
    target = answer_logprob(refs.target, refs.answer_ids)
    return (answer_logprob(restored, refs.answer_ids) - target) / (answer_logprob(refs.source, refs.answer_ids) - target)


def _kl_denominator(refs: References) -> float:
    value = float(kl_from(refs.source, refs.target))
    if value < 1e-9:
        raise DegenerateMetricError(f"KL(source || target) = {value:.3g} nats: the models agree, the recovered "
                                    "fraction of KL is undefined")
    return value


def _kl(restored: torch.Tensor, refs: References) -> torch.Tensor:
    return 1.0 - kl_from(refs.source, restored) / kl_from(refs.source, refs.target)


def _top1(restored: torch.Tensor, refs: References) -> torch.Tensor:
    return (restored.argmax(-1) == refs.answer_ids.to(restored.device)).float().mean(-1)


def _check_metric(name: str, metric: Any) -> None:
    if not isinstance(metric, Metric):
        raise PatchlabValueError(f"a metric registry entry is a Metric, got {type(metric).__name__}")


#: The recovery metrics by name (built-ins below; :func:`register_metric` adds one).
RECOVERY_METRICS: Registry[Metric] = Registry("metric", check=_check_metric)


def register_metric(name: str, fn: MetricFn, *, description: str = "",
                    denominator: Callable[[References], float] | None = None, overwrite: bool = False) -> Metric:
    """Register ``fn(restored, refs) -> [row]`` as metric ``name`` (see the module docstring); returns the entry.

    Raises:
        PatchlabValueError: ``name`` is taken (without ``overwrite``) or ``fn`` is not callable.
    """
    if not callable(fn):
        raise PatchlabValueError(f"a metric is a callable fn(restored, refs) -> [row], got {type(fn).__name__}")
    entry = Metric(name, fn, description or getattr(fn, "__doc__", None) or name, denominator)
    return RECOVERY_METRICS.register(entry, name, replace=overwrite)


def get_metric(metric: str | Metric | MetricFn) -> Metric:
    """A registered metric by name, a :class:`Metric` as is, or a plain function wrapped as an unregistered one."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return RECOVERY_METRICS.get(metric)
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, getattr(metric, "__doc__", None) or "custom")
    raise PatchlabValueError(f"metric must be a name, a Metric or a function, got {type(metric).__name__}")


def metrics() -> tuple[str, ...]:
    """Names of the registered metrics."""
    return RECOVERY_METRICS.names()


register_metric("krs", _krs, description="Knowledge Recovery Score, 1 - MSE(l_r, l_v) / MSE(l_u, l_v)",
                denominator=_mse_denominator)
register_metric("logprob", _logprob, description="recovered fraction of the answer's log-probability gap",
                denominator=_logprob_denominator)
register_metric("kl", _kl, description="recovered fraction of KL(vanilla || unlearned)", denominator=_kl_denominator)
register_metric("top1", _top1, description="top-1 agreement with the vanilla answer tokens")
register_metric("answer_logprob", lambda restored, refs: answer_logprob(restored, refs.answer_ids),
                description="mean log-probability of the answer tokens (nats)")
