"""Mask densities: the selected fraction of weights per module type and layer (:func:`density`), and the
:class:`DensityReport` result comparing several masks side by side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
import plotly.graph_objects as go
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from patchlab.errors import PatchlabValueError
from patchlab.pair.arch import MODULE_ORDER, arch_spec, layer_index
from patchlab.provenance import checkpoint_record, environment
from patchlab.results import Result, register_result
from patchlab.schema import Count, Provenance, Schema, Unit, bad
from patchlab.unlearning.masks import Mask


def density(mask: Mask, model: PreTrainedModel) -> pd.DataFrame:
    """Selected weights per (module type, layer): columns ``module``, ``layer`` (``<NA>`` outside the decoder
    layers), ``selected``, ``total``, ``scored`` (weight counts; ``scored``: those the mask holds, i.e. that the
    method scored) and ``density = selected / total`` (0..1; 0 also where nothing was scored, which the figures
    show as "not scored").

    Module types from the family's :attr:`~patchlab.pair.arch.ArchSpec.module_types` (a tied LM head is the
    embedding); parameters of ``model`` absent from the mask count as not selected.

    Raises:
        PatchlabValueError: a mask tensor does not have its parameter's shape.
    """
    spec = arch_spec(model)
    rows: dict[tuple[str, int | None], list[int]] = {}  # (module, layer) -> [selected, total, scored]
    for name, p in model.named_parameters():
        m = mask.get(name)
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise PatchlabValueError(f"mask for {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        cell = rows.setdefault((spec.module_type(name), layer_index(name, spec)), [0, 0, 0])
        cell[0] += int(m.sum()) if m is not None else 0
        cell[1] += p.numel()
        cell[2] += p.numel() if m is not None else 0
    frame = pd.DataFrame([(k, layer, s, t, n) for (k, layer), (s, t, n) in rows.items()],
                         columns=["module", "layer", "selected", "total", "scored"])
    frame["layer"] = frame["layer"].astype("Int64")
    frame["density"] = frame["selected"] / frame["total"]
    return frame


def module_density(frame: pd.DataFrame) -> pd.DataFrame:
    """A :func:`density` frame summed over layers: one row per module type (display order), same columns
    but ``layer``; keeps a ``method`` column if there is one."""
    keys = ["method", "module"] if "method" in frame else ["module"]
    counts = [c for c in ("selected", "total", "scored") if c in frame]  # results saved before "scored" lack it
    agg = frame.groupby(keys, as_index=False, sort=False)[counts].sum()
    agg["density"] = agg["selected"] / agg["total"]
    rank = {m: i for i, m in enumerate(MODULE_ORDER)}
    return agg.sort_values(keys, key=lambda c: c.map(rank) if c.name == "module" else c, kind="stable",
                           ignore_index=True)


def stack_densities(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The :func:`density` frames of ``{method: frame}`` as one long frame with a ``method`` column, methods in
    the mapping's order.

    Raises:
        PatchlabValueError: no frame given.
    """
    if not isinstance(frames, Mapping) or not frames:
        raise PatchlabValueError("no density frame given: pass a non-empty {method: density frame} mapping")
    return pd.concat([f.assign(method=name) for name, f in frames.items()], ignore_index=True)


#: The views of :meth:`DensityReport.figure`: WAGLE's bars per module type, and layer x module heatmaps.
DENSITY_VIEWS = ("modules", "layers")


class DensityRow(Schema):
    """One row of a :class:`DensityReport` file: a method's selected weights of a module type in a layer (``null``
    outside the decoder layers); ``scored``, the weights the method scored, is absent from files written before it
    was recorded."""

    module: Annotated[str, Field(min_length=1)]
    layer: Count | None
    selected: Count
    total: Annotated[int, Field(ge=1, lt=2**63)]
    scored: Count | None = None
    density: Unit
    method: Annotated[str, Field(min_length=1)]


class DensityReportFile(Schema):
    """A :class:`DensityReport` file: one row per (method, module type, layer), ``selected <= total`` and
    ``density = selected / total``, some row in a decoder layer."""

    format: Literal["patchlab.DensityReport/1"]
    provenance: Provenance
    densities: Annotated[list[DensityRow], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> DensityReportFile:
        seen: set[tuple[str, str, int | None]] = set()
        for i, row in enumerate(self.densities):
            if row.selected > row.total:
                raise bad(f"densities[{i}].selected", "{selected} weights selected of {total}",
                          selected=row.selected, total=row.total)
            if row.scored is not None and not row.selected <= row.scored <= row.total:
                raise bad(f"densities[{i}].scored", "{scored} weights scored, {selected} selected of {total}",
                          scored=row.scored, selected=row.selected, total=row.total)
            if row.density != row.selected / row.total:
                raise bad(f"densities[{i}].density", "{density} is not selected / total = {selected} / {total}",
                          density=row.density, selected=row.selected, total=row.total)
            key = (row.method, row.module, row.layer)
            if key in seen:
                raise bad(f"densities[{i}]", "a second row for method {method!r}, module {module!r}, layer {layer}",
                          method=row.method, module=row.module, layer=row.layer)
            seen.add(key)
        if all(row.layer is None for row in self.densities):
            raise bad("densities", "no row of a decoder layer (every layer is null)")
        return self


@register_result
@dataclass(frozen=True)
class DensityReport(Result):
    """Densities of several methods' masks, side by side (:func:`density_report`).

    Attributes:
        table: per method, module type and layer (:func:`stack_densities`): ``module``, ``layer``, ``selected``,
            ``total``, ``density`` (0..1), ``method`` (also :meth:`to_frame`).
        provenance: the scored model (source and weights digest), the settings, the library versions.
    """

    kind = "density"
    format = "patchlab.DensityReport/1"
    schema = DensityReportFile

    table: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods, in the order they were given."""
        return list(dict.fromkeys(self.table["method"]))

    @property
    def per_module(self) -> pd.DataFrame:
        """Per method and module type (:func:`module_density` of :attr:`table`)."""
        return module_density(self.table)

    def by_method(self) -> pd.DataFrame:
        """Density (0..1) per module type (rows, display order) and method (columns, given order)."""
        per_module = self.per_module
        return (per_module.pivot(index="module", columns="method", values="density")
                .reindex(index=list(dict.fromkeys(per_module["module"])), columns=self.methods))

    def to_frame(self) -> pd.DataFrame:
        """:attr:`table`: one row per method, module type and layer."""
        return self.table

    def figure(self, view: str = "modules") -> go.Figure:
        """One of WAGLE's figures, methods side by side: ``view="modules"``, grouped bars of the density per module
        type over all layers (:func:`patchlab.reports.figures.density_bars`); ``"layers"``, one layer x module
        heatmap per method, decoder layers only, on a shared 0..1 colour scale
        (:func:`patchlab.reports.figures.density_heatmaps`).

        Raises:
            PatchlabValueError: an unknown view; ``"layers"`` with no decoder-layer parameter in the table.
        """
        if view not in DENSITY_VIEWS:
            raise PatchlabValueError(f"view must be one of {DENSITY_VIEWS}, got {view!r}")
        return super().figure(view=view)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``density`` (:attr:`table`) and ``density_modules`` (:attr:`per_module`)."""
        return {self.kind: self.table, f"{self.kind}_modules": self.per_module}

    def figures(self) -> dict[str, go.Figure]:
        """``density_modules`` and ``density_layers``: the two views of :meth:`figure`."""
        return {f"{self.kind}_{view}": self.figure(view) for view in DENSITY_VIEWS}

    def to_dict(self) -> dict[str, Any]:
        rows = self.table.astype({"layer": object}).to_dict("records")
        counts = [c for c in ("layer", "scored") if c in self.table]  # integer columns that may lack values
        return {"provenance": self.provenance,
                "densities": [{**r, **{c: None if pd.isna(r[c]) else int(r[c]) for c in counts}} for r in rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DensityReport:
        return cls(pd.DataFrame(data["densities"]).astype({"layer": "Int64"}), provenance=data["provenance"])


def density_report(frames: Mapping[str, pd.DataFrame], *, model: PreTrainedModel | None = None,
                   source: Any = None, settings: Mapping[str, Any] | None = None) -> DensityReport:
    """The densities of ``{method: density frame}`` (:func:`density`) side by side, with their per-module densities
    and WAGLE's two figures (:meth:`DensityReport.figure`).

    Args:
        model: the model the masks were drawn for; recorded in the provenance (its weights digest, and ``source``:
            how it was given, a checkpoint directory or hub id; default: the model itself) with ``settings`` (how
            the masks were drawn: method settings, ratio...) and the library versions.

    Raises:
        PatchlabValueError: no frame given, or no decoder-layer parameter in the frames.
    """
    table = stack_densities(frames)
    if table["layer"].isna().all():
        raise PatchlabValueError("the density frames have no decoder-layer parameter")
    provenance: dict[str, Any] = {"settings": dict(settings or {}), "environment": environment()}
    if model is not None:
        provenance["model"] = checkpoint_record(model if source is None else source, model)
    return DensityReport(table, provenance)


def density_figures(frames: Mapping[str, pd.DataFrame]) -> tuple[go.Figure, go.Figure]:
    """WAGLE's two figures from ``{method: density frame}``, methods side by side.

    Returns:
        (bars, heatmaps): grouped bars of the density per module type (over all layers), one bar per method;
        and one layer x module-type heatmap per method (decoder layers only) on a shared 0..1 colour scale
        (:meth:`DensityReport.figure`, views ``"modules"`` and ``"layers"``).

    Raises:
        PatchlabValueError: no frame given, or no decoder-layer parameter in the frames.
    """
    report = density_report(frames)
    return report.figure("modules"), report.figure("layers")
