"""Restore kinds: how a restoration computes a site's new value, one registered entry per kind.

A :class:`~patchlab.pair.sites.Site` names its kind (``Site.restore``). Every engine gathers the restored
``(row, position)`` pairs of a site into a :class:`Restoration` (``[n, d]`` tensors), calls the kind's
:attr:`RestoreKind.apply` and writes the ``[n, d]`` result back at those pairs: the batched engine
(:mod:`patchlab.patching.engine`, index writes in torch hooks), the plain nnsight loop
(:mod:`patchlab.patching.loop`, inside the trace, on real tensors) and the TransformerLens adapter
(:mod:`patchlab.patching.lens`, in ``fwd_hooks``). A new kind is one :func:`register_restore_kind` call; a site
using it then works in every engine, sweep and the CLI::

    def scaled(r: Restoration) -> torch.Tensor:          # vanilla * 0.5 + unlearned * 0.5
        return 0.5 * r.source.to(r.current.dtype) + 0.5 * r.current
    register_restore_kind(RestoreKind("half", ("input", "output"), scaled))
    register_site(Site("half_coef", "mlp.down_proj", "input", "half"))

Built-in kinds:

* ``overwrite`` - the source activation (the site's cached point);
* ``recompute`` - the module's output recomputed with the source parameters on the patched model's input;
* ``per_head`` - an attention output projection's output plus :func:`head_delta` of the restored heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from jaxtyping import Bool, Float
from torch import nn
from transformers.pytorch_utils import Conv1D

from patchlab.errors import PatchlabValueError
from patchlab.pair.sites import RestoreRule, declare_restore


def apply_module(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module``'s computation on ``x`` with ``params`` in place of its own (no hooks run): ``nn.Linear`` and
    GPT-2's ``Conv1D`` directly, any other module through ``torch.func.functional_call``."""
    weight, bias = params.get("weight"), params.get("bias")
    if isinstance(module, nn.Linear):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if isinstance(module, Conv1D):
        out = x @ weight.to(x.dtype)
        return out if bias is None else out + bias.to(x.dtype)
    return torch.func.functional_call(module, params, (x,))


def head_delta(module: nn.Module, source_params: dict[str, torch.Tensor], target_params: dict[str, torch.Tensor],
               z_target: torch.Tensor, z_source: torch.Tensor, heads: Bool[torch.Tensor, "n head"]
               ) -> Float[torch.Tensor, "n d_model"]:
    """The change of an attention output projection's output when the ``heads`` of each of ``n`` positions are
    restored: ``W_s (z_s ⊙ m) - W_t (z_t ⊙ m) + (|H| / n_heads) (b_s - b_t)``, with ``m`` the head mask expanded
    to each head's slice of the projection's input ``z`` (``[n, n_heads * head_dim]``), ``module`` the projection
    (its type), ``*_params`` the source and target parameters. The bias change is shared evenly among the heads, so
    restoring every head restores the whole projection output (the ``attn`` site)."""
    mask = repeat(heads, "n head -> n (head d_head)", d_head=z_target.shape[-1] // heads.shape[-1]).to(z_target.dtype)
    restored = apply_module(module, source_params, z_source.to(z_target.dtype) * mask)
    removed = apply_module(module, target_params, z_target * mask)
    if "bias" in source_params and source_params["bias"] is not None:
        bias_rest = 1.0 - heads.float().mean(-1, keepdim=True)  # [n, 1]: the bias share of the heads not restored
        restored = restored - bias_rest.to(restored.dtype) * (source_params["bias"].to(restored.dtype)
                                                             - target_params["bias"].to(restored.dtype))
    return restored - removed


def head_mask(heads: frozenset[int] | None, n_head: int) -> Bool[torch.Tensor, "1 head"]:
    """The mask of the restored ``heads`` (``None``: all) among ``n_head`` heads.

    Raises:
        PatchlabValueError: a head index outside ``0..n_head - 1``.
    """
    mask = torch.zeros(1, n_head, dtype=torch.bool)
    if heads is None:
        mask[:] = True
    else:
        bad = [h for h in heads if not 0 <= h < n_head]
        if bad:
            raise PatchlabValueError(f"head indices {bad} out of range: the model has {n_head} heads per layer")
        mask[0, sorted(heads)] = True
    return mask


@dataclass(frozen=True)
class Restoration:
    """What a restore kind sees at the ``n`` restored ``(row, position)`` pairs of one site in one layer, all on
    the device of the site's module.

    Attributes:
        current: ``[n, d]`` the patched (target) model's value where the kind writes: the site's read point, or
            for kinds that recompute, the module's output.
        source: ``[n, d_cached]`` the source (vanilla) activation at the site's cached point; ``None`` for sites
            read from the weights.
        input: ``[n, d_in]`` the module's input in the patched model (restored upstream sites included); only for
            kinds that recompute, else ``None``.
        module: the site's module in the patched model (its type for :func:`apply_module`).
        source_params: the source model's parameters of the module (kinds that recompute), else ``None``.
        target_params: the patched model's own parameters of the module (kinds with heads), else ``None``.
        heads: ``[n, n_head]`` mask of the restored heads (kinds with heads), else ``None``.
    """

    current: torch.Tensor
    source: torch.Tensor | None = None
    input: torch.Tensor | None = None
    module: nn.Module | None = None
    source_params: dict[str, torch.Tensor] | None = None
    target_params: dict[str, torch.Tensor] | None = None
    heads: torch.Tensor | None = None


@dataclass(frozen=True)
class RestoreKind:
    """One restore kind.

    Attributes:
        name: the name sites use (``Site.restore``).
        reads: the ``Site.reads`` it accepts (``"input"``, ``"output"``, ``"weight"``).
        apply: ``fn(restoration) -> [n, d]``, the new value at the restored pairs (any dtype; the engines cast it
            to the activation's). It must work row-wise: row ``k`` of the result depends on row ``k`` of the inputs.
        recomputes: it computes the module's output from the module's input (``input``, ``source_params`` given;
            the hook sits on the output); otherwise it rewrites the value at the site's read point.
        heads: it takes a head list and receives ``heads`` and ``target_params`` (implies ``recomputes``).
    """

    name: str
    reads: tuple[str, ...]
    apply: Callable[[Restoration], torch.Tensor]
    recomputes: bool = False
    heads: bool = False

    @property
    def rule(self) -> RestoreRule:
        """What the kind needs of its sites, as :class:`patchlab.pair.sites.Site` checks it."""
        return RestoreRule(tuple(self.reads), self.recomputes or self.heads, self.heads)


_KINDS: dict[str, RestoreKind] = {}


def register_restore_kind(kind: RestoreKind, *, overwrite: bool = False) -> None:
    """Register ``kind``: sites may then name it (``Site(..., restore=kind.name)``) and every engine applies it.

    Raises:
        PatchlabValueError: not a :class:`RestoreKind`, a name that exists (without ``overwrite``), or reads
            outside ``input`` / ``output`` / ``weight`` (``weight`` only for kinds that recompute).
    """
    if not isinstance(kind, RestoreKind) or not callable(kind.apply):
        raise PatchlabValueError(f"register_restore_kind needs a RestoreKind with a callable apply, got {kind!r}")
    if kind.name in _KINDS and not overwrite:
        raise PatchlabValueError(f"restore kind {kind.name!r} already exists (pass overwrite=True to replace it)")
    declare_restore(kind.name, kind.rule)
    _KINDS[kind.name] = kind


def unregister_restore_kind(name: str) -> None:
    """Remove the restore kind ``name`` (sites using it can no longer be built).

    Raises:
        PatchlabValueError: ``name`` is a built-in kind.
    """
    if name in BUILTIN_KINDS:
        raise PatchlabValueError(f"the built-in restore kind {name!r} cannot be removed")
    _KINDS.pop(name, None)
    declare_restore(name, None)


def restore_kind(name: str) -> RestoreKind:
    """The registered :class:`RestoreKind` ``name``.

    Raises:
        PatchlabValueError: no kind of that name.
    """
    if name not in _KINDS:
        raise PatchlabValueError(f"unknown restore kind {name!r}; registered: {', '.join(_KINDS)}")
    return _KINDS[name]


def _overwrite(r: Restoration) -> torch.Tensor:
    return r.source


def _recompute(r: Restoration) -> torch.Tensor:
    return apply_module(r.module, r.source_params, r.input)


def _per_head(r: Restoration) -> torch.Tensor:
    delta = head_delta(r.module, r.source_params, r.target_params, r.input, r.source, r.heads)
    return r.current + delta.to(r.current.dtype)


#: The kinds every site table starts with.
BUILTIN_KINDS = ("overwrite", "recompute", "per_head")

register_restore_kind(RestoreKind("overwrite", ("input", "output"), _overwrite))
register_restore_kind(RestoreKind("recompute", ("weight",), _recompute, recomputes=True))
register_restore_kind(RestoreKind("per_head", ("input",), _per_head, recomputes=True, heads=True))
