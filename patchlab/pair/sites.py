"""Sites as data: where, inside a decoder layer, a piece of the vanilla computation can be restored.

A :class:`Site` names a module inside a decoder layer (a path relative to the layer, ``""`` for the layer
itself), what of it is read (its ``input``, its ``output``, or its ``weight``) and how a restoration writes it:

* ``overwrite`` - the activation is replaced by the vanilla model's activation at the same site;
* ``recompute`` - the module's output is recomputed with the vanilla module's parameters on the (possibly
  restored) input of the patched model (a weight swap, computed, never a copied state dict);
* ``per_head`` - the module is an attention output projection whose input is the concatenation of the heads'
  outputs; restoring head ``h`` replaces its contribution to the projection's output (its slice of the weight
  applied to its slice of the input) with the vanilla model's, vanilla weight included.

These are the built-in *restore kinds*; :func:`patchlab.patching.restore.register_restore_kind` adds others (their
computation lives there, their :class:`RestoreRule` here, so sites can be checked where they are defined).

Every family's :class:`~patchlab.pair.arch.ArchSpec` holds a table of sites (:func:`default_sites`); caches,
the batched and loop engines and the TransformerLens adapter iterate it. A *component* is a ``+``-joined set of
site names, where ``heads`` may carry a head subset: ``"coef+attn"``, ``"heads[0,3]"``, ``"coef+heads"``.

One small hook primitive, :func:`hook`, reads or rewrites a module's input or output; every capture in patchlab
(activation caches, MEMIT's key covariance, Wanda's input norms, RMU's layer activations) goes through it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchlab.errors import PatchlabValueError

READS = ("input", "output", "weight")


@dataclass(frozen=True)
class RestoreRule:
    """What a restore kind needs of its sites (the kind's computation is registered with
    :func:`patchlab.patching.restore.register_restore_kind`, which declares its rule here).

    Attributes:
        reads: the ``Site.reads`` the kind accepts.
        recomputes: the kind rewrites the module's output from the module's input (its hook sits on the output);
            otherwise it rewrites the value at the site's read point itself.
        heads: the kind takes a head list (``"heads[0,3]"``) and a per-head mask.
    """

    reads: tuple[str, ...]
    recomputes: bool = False
    heads: bool = False


_RESTORE_RULES: dict[str, RestoreRule] = {
    "overwrite": RestoreRule(("input", "output")),
    "recompute": RestoreRule(("weight",), recomputes=True),
    "per_head": RestoreRule(("input",), recomputes=True, heads=True),
}


def restore_rule(name: str) -> RestoreRule:
    """The :class:`RestoreRule` of the restore kind ``name``.

    Raises:
        PatchlabValueError: no kind of that name is registered.
    """
    if name not in _RESTORE_RULES:
        raise PatchlabValueError(f"unknown restore kind {name!r}; registered: {', '.join(_RESTORE_RULES)}")
    return _RESTORE_RULES[name]


def declare_restore(name: str, rule: RestoreRule | None) -> None:
    """Declare (``rule``) or withdraw (``None``) the restore kind ``name``'s rule; only
    :mod:`patchlab.patching.restore`'s registry calls this."""
    if rule is None:
        _RESTORE_RULES.pop(name, None)
    else:
        if not rule.reads or any(r not in READS for r in rule.reads):
            raise PatchlabValueError(f"restore kind {name!r}: reads must be a non-empty subset of {READS}, "
                                     f"got {rule.reads!r}")
        if "weight" in rule.reads and not rule.recomputes:
            raise PatchlabValueError(f"restore kind {name!r}: a kind reading weights must recompute the output")
        _RESTORE_RULES[name] = rule


@dataclass(frozen=True)
class Site:
    """One restorable site of a decoder layer.

    Attributes:
        name: the site's name in components and caches (``"coef"``); letters, digits and ``_`` only.
        module: path of the module inside a decoder layer (``"mlp.down_proj"``); ``""`` is the layer itself.
        reads: ``"input"`` (the module's first positional input), ``"output"`` (its output; the first element
            of a tuple output) or ``"weight"`` (its parameters).
        restore: ``"overwrite"``, ``"recompute"``, ``"per_head"`` (see the module docstring) or a kind registered
            with :func:`patchlab.patching.restore.register_restore_kind`.
        description: one line for tables and docs.
    """

    name: str
    module: str
    reads: str
    restore: str
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise PatchlabValueError(f"a site name is an identifier such as 'coef', got {self.name!r}")
        if not isinstance(self.module, str):
            raise PatchlabValueError(f"site {self.name!r}: module must be a path string, got {self.module!r}")
        if self.reads not in READS or self.restore not in _RESTORE_RULES:
            raise PatchlabValueError(f"site {self.name!r}: reads must be one of {READS} and restore one of "
                                     f"{tuple(_RESTORE_RULES)}, got {self.reads!r} / {self.restore!r}")
        expected = _RESTORE_RULES[self.restore].reads
        if self.reads not in expected:
            raise PatchlabValueError(f"site {self.name!r}: restore={self.restore!r} needs reads in "
                                     f"{expected}, got {self.reads!r}")

    @property
    def cached(self) -> str | None:
        """What of the vanilla run a restoration needs cached: ``"input"``, ``"output"`` or ``None`` (weights)."""
        return None if self.reads == "weight" else self.reads

    @property
    def point(self) -> str:
        """Where the restoring hook attaches: the module's ``"input"`` (before it runs) or ``"output"``."""
        return "output" if self.rule.recomputes or self.reads == "output" else "input"

    @property
    def rule(self) -> RestoreRule:
        """The :class:`RestoreRule` of this site's restore kind."""
        return restore_rule(self.restore)


def default_sites(attn_out: str, mlp_down: str, mlp: str) -> tuple[Site, ...]:
    """The built-in site table of a family whose attention output projection, MLP down projection and MLP block
    live at these paths inside a decoder layer.

    ``coef``, ``value`` and ``attn`` are the paper's three sites (Hong et al., section 3); ``heads`` restores
    attention heads one by one (all heads together equal ``attn``); ``mlp_out`` is the MLP block's output;
    ``resid`` the decoder layer's output, the residual stream after the layer.
    """
    return (
        Site("coef", mlp_down, "input", "overwrite", "MLP coefficients: the input of the MLP down projection"),
        Site("value", mlp_down, "weight", "recompute", "MLP value vectors: the down projection's weight and bias"),
        Site("attn", attn_out, "output", "overwrite", "attention output: the output of the output projection"),
        Site("heads", attn_out, "input", "per_head", "attention heads: each head's slice of the output projection"),
        Site("mlp_out", mlp, "output", "overwrite", "MLP output: the output of the whole MLP block"),
        Site("resid", "", "output", "overwrite", "residual stream: the decoder layer's output"),
    )


# ------------------------------------------------------------------------------------------------- components

_PART = re.compile(r"^(?P<site>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<heads>[0-9,\s]*)\])?$")


@dataclass(frozen=True)
class Component:
    """A set of sites restored together, with an optional head subset for ``per_head`` sites.

    Attributes:
        sites: the site names.
        heads: the restored heads of the ``per_head`` sites (``None``: all heads).
        label: the name as written (``"coef+attn"``, ``"heads[3]"``), used as the result's row label.
    """

    sites: frozenset[str]
    heads: frozenset[int] | None
    label: str


def parse_component(component: str | Iterable[str], sites: Sequence[Site] | None = None) -> Component:
    """A component from a name such as ``"coef"``, ``"coef+attn"`` or ``"heads[0,3]"``, or an iterable of site
    names (``{"coef", "attn"}``).

    Args:
        sites: the site table to check names against (default: the built-in one).

    Raises:
        PatchlabValueError: empty name or set, an unknown site, a head list on a site that is not ``per_head``,
            or an argument that is neither a string nor an iterable of strings.
    """
    table = {s.name: s for s in (sites if sites is not None else default_sites("o", "d", "m"))}
    if isinstance(component, str):
        parts, label = [p.strip() for p in component.split("+")], component
    else:
        try:
            parts = sorted(component)
        except TypeError as err:
            raise PatchlabValueError(f"a component is a name such as 'coef+attn' or an iterable of site names, "
                                     f"got {component!r}") from err
        label = "+".join(parts)
    names, heads = [], None
    for part in parts:
        match = _PART.match(part) if isinstance(part, str) else None
        if match is None or match["site"] not in table:
            raise PatchlabValueError(f"unknown component {component!r}: use site names from {', '.join(table)} "
                                     "joined with '+' (heads may take a subset: heads[0,3])")
        if match["heads"] is not None:
            if not table[match["site"]].rule.heads:
                raise PatchlabValueError(f"component {component!r}: only per-head sites take a head list")
            picked = [h.strip() for h in match["heads"].split(",") if h.strip()]
            if not picked:
                raise PatchlabValueError(f"component {component!r}: empty head list")
            heads = frozenset(int(h) for h in picked)
        names.append(match["site"])
    if not names or len(set(names)) != len(names):
        raise PatchlabValueError(f"component {component!r} is empty or repeats a site")
    return Component(frozenset(names), heads, label)


# ------------------------------------------------------------------------------------------------- the hook

def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with ``""`` meaning ``root``; raises PatchlabValueError naming the path."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as err:
        raise PatchlabValueError(f"{type(root).__name__} has no submodule {path!r}") from err


def first(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tuple (its first element)."""
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


HookFn = Callable[..., "torch.Tensor | None"]


@contextlib.contextmanager
def hook(module: nn.Module, point: str, fn: HookFn, *, with_input: bool = False) -> Iterator[None]:
    """While active, call ``fn`` on ``module``'s ``point`` (``"input"``: its first positional input, before it runs;
    ``"output"``: its output, or the output's first element for tuple outputs). ``fn`` may return a tensor to
    replace that value (same structure kept) or ``None`` to only read it.

    With ``with_input=True`` an output hook is called as ``fn(output, input)`` (``input`` the first positional
    argument, as the module received it).

    This is patchlab's one hook primitive (after baukit's ``Trace``): caches, restorations, MEMIT's key
    covariance, Wanda's input norms and RMU's activations all use it.

    Raises:
        PatchlabValueError: ``point`` is not ``"input"`` or ``"output"``.
    """
    if point == "input":
        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    elif point == "output":
        def post(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            value = first(output)
            new = fn(value, args[0] if args else kwargs.get("hidden_states")) if with_input else fn(value)
            return None if new is None else _replace_first(output, new)
        handle = module.register_forward_hook(post, with_kwargs=True)
    else:
        raise PatchlabValueError(f"point must be 'input' or 'output', got {point!r}")
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def hooks(specs: Iterable[tuple[nn.Module, str, HookFn] | tuple[nn.Module, str, HookFn, bool]]) -> Iterator[None]:
    """Several :func:`hook` s at once: ``(module, point, fn)`` triples, or ``(module, point, fn, with_input)``
    (``with_input`` as :func:`hook`'s, default ``False``), all removed on exit."""
    with contextlib.ExitStack() as stack:
        for module, point, fn, *with_input in specs:
            stack.enter_context(hook(module, point, fn, with_input=bool(with_input) and with_input[0]))
        yield


@contextlib.contextmanager
def recording(modules: Sequence[nn.Module], point: str) -> Iterator[list[torch.Tensor]]:
    """Record ``point`` (``"input"`` / ``"output"``) of each module every time it runs, in call order."""
    seen: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        seen.append(value)
    with hooks((m, point, keep) for m in modules):
        yield seen


class StopForward(Exception):
    """Raised by a read-only :func:`hook` to end a forward pass once everything it needs has run (the caller
    catches it); only for a model run outside autograd and any distributed wrapper, such as a frozen reference
    or a no-grad statistics pass, since the layers above never run."""
