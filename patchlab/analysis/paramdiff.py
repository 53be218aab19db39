"""Parameter diffs between a vanilla model and its unlearned copy: cosine similarity, ``1 - cos``, the angle and
the relative L2 change of every tensor, pooled per module type and per layer; streamed tensor by tensor from
safetensors checkpoints so two 7B checkpoints never need to be in memory at once.

Fine-tuning unlearning moves weights very little: on a 135M model unlearned with GradDiff or NPO, ``1 - cos`` is
about 1e-8 per module, so the cosine itself reads 1.0 everywhere. ``1 - cos`` is therefore computed without
forming the cosine (:func:`one_minus_cos`, accurate to float64 rounding of the difference), and the figures and
tables show it, the angle and the relative L2 change on log / scientific scales."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from patchlab.pair.arch import MODULE_ORDER, layer_index, module_order, spec_for_type
from patchlab.errors import NonFiniteError, PairMismatchError, PatchlabValueError
from patchlab.pair.weights import CheckpointTensors
from patchlab.pair import ModelPair
from patchlab.provenance import pair_provenance
from patchlab.results import Result, register_result
from patchlab.schema import AnyFloat, Count, Provenance, Schema, bad

CHUNK = 1 << 24  # elements per float64 chunk
#: Per tensor / module / layer: cosine similarity, 1 - cosine, angle (degrees), relative L2 change |b-a|/|a|.
PARAM_METRICS = ("cosine", "one_minus_cos", "angle_deg", "rel_l2")
#: The metrics drawn on a log colour scale (they span orders of magnitude; cosine is drawn linearly).
LOG_METRICS = ("one_minus_cos", "angle_deg", "rel_l2")
METRIC_LABELS = {"cosine": "cosine", "one_minus_cos": "1 - cos", "angle_deg": "angle (degrees)",
                 "rel_l2": "|b-a| / |a|"}
_SUMS = ["numel", "dot", "norm_a2", "norm_b2", "diff2", "dot_ad"]


class _Source:
    """Named tensors of a model or of a safetensors checkpoint directory, loaded one at a time."""

    def __init__(self, source: Any, what: str):
        if isinstance(source, PreTrainedModel):
            params = dict(source.named_parameters())
            self.shapes = {n: tuple(p.shape) for n, p in params.items()}
            self._get = lambda name: params[name].detach()
            self.model_type = source.config.model_type
        elif isinstance(source, (str, os.PathLike)):
            tensors = CheckpointTensors(source, what)
            self.shapes, self._get, self.model_type = tensors.shapes, tensors.get, tensors.model_type
        else:
            raise PatchlabValueError(f"{what} must be a PreTrainedModel or a checkpoint directory, got {type(source).__name__}")

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Sums that pool exactly across tensors (float64, chunked): ``dot = <a,b>``, ``norm_a2 = |a|²``,
    ``norm_b2 = |b|²``, ``diff2 = |b-a|²`` and ``dot_ad = <a, b-a>``."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    out = dict(dot=0.0, norm_a2=0.0, norm_b2=0.0, diff2=0.0, dot_ad=0.0)
    for i in range(0, fa.numel(), CHUNK):
        x, y = fa[i:i + CHUNK].double(), fb[i:i + CHUNK].double()
        d = y - x
        out["dot"] += float(x @ y)
        out["norm_a2"] += float(x @ x)
        out["norm_b2"] += float(y @ y)
        out["diff2"] += float(d @ d)
        out["dot_ad"] += float(x @ d)
    return out


def one_minus_cos(norm_a2: Float[Any, "*n"], norm_b2: Float[Any, "*n"], diff2: Float[Any, "*n"],
                  dot_ad: Float[Any, "*n"]) -> Float[Any, "*n"]:
    """``1 - cos(a, b)`` from the sums of :func:`tensor_stats` (numpy arrays or torch tensors, any shape), without
    the cancellation of ``1 - <a,b>/(|a||b|)``.

    With ``d = b - a``: ``1 - cos = (|d|² - (|b| - |a|)²) / (2|a||b|)`` and ``|b| - |a| = (|b|² - |a|²) / (|a| + |b|)``
    where ``|b|² - |a|² = 2<a,d> + |d|²``; every term is of the size of the change, so the result keeps full
    float64 precision relative to ``|d|²/|a|²`` even when ``1 - cos`` is 1e-12. Rounding below 0 (a change that
    only rescales) gives 0; NaN when ``a`` or ``b`` is zero.
    """
    norm_a, norm_b = norm_a2 ** 0.5, norm_b2 ** 0.5
    radial = (2 * dot_ad + diff2) / (norm_a + norm_b)  # |b| - |a|
    value = (diff2 - radial * radial) / (2 * norm_a * norm_b)
    return (value + abs(value)) / 2  # max(value, 0) for floats, numpy / pandas and torch alike


def angle_deg(one_minus_cosine: Float[Any, "*n"]) -> Float[Any, "*n"]:
    """The angle between ``a`` and ``b`` in degrees, ``2 asin(sqrt((1 - cos) / 2))``, from ``1 - cos`` (accurate
    for tiny angles, where ``acos(cos)`` is not)."""
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(one_minus_cosine, 0.0, 2.0) / 2)))


def _metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the :data:`PARAM_METRICS` columns from the pooled sums: ``cosine = <a,b>/(|a||b|)``, ``one_minus_cos``
    (:func:`one_minus_cos`), ``angle_deg`` (:func:`angle_deg`) and ``rel_l2 = |b-a|/|a|``."""
    frame = frame.copy()
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero tensors give NaN / inf
        frame["cosine"] = frame["dot"] / np.sqrt(frame["norm_a2"] * frame["norm_b2"])
        frame["one_minus_cos"] = one_minus_cos(frame["norm_a2"], frame["norm_b2"], frame["diff2"], frame["dot_ad"])
        frame["angle_deg"] = angle_deg(frame["one_minus_cos"])
        frame["rel_l2"] = np.sqrt(frame["diff2"] / frame["norm_a2"])
    return frame


class TensorRow(Schema):
    """One tensor's row of a :class:`ParamDiff` file: its pooled sums are finite (:func:`paramdiff` refuses
    non-finite tensors), its :data:`PARAM_METRICS` may be NaN or infinite (an all-zero tensor has no cosine)."""

    name: Annotated[str, Field(min_length=1)]
    module: Annotated[str, Field(min_length=1)]
    layer: Annotated[int, Field(ge=-1, lt=2**31)]
    numel: Count
    dot: float
    norm_a2: Annotated[float, Field(ge=0)]
    norm_b2: Annotated[float, Field(ge=0)]
    diff2: Annotated[float, Field(ge=0)]
    dot_ad: float
    cosine: AnyFloat
    one_minus_cos: AnyFloat
    angle_deg: AnyFloat
    rel_l2: AnyFloat


class ValueVectorRow(Schema):
    """One row of :func:`value_vector_changes`: a changed MLP value vector and the tokens it promotes."""

    layer: Count
    index: Count
    cosine: AnyFloat
    one_minus_cos: AnyFloat
    rel_l2: Annotated[float, Field(ge=0)]
    top_tokens_vanilla: list[str]
    top_tokens_unlearned: list[str]


class ParamDiffFile(Schema):
    """A :class:`ParamDiff` file: one row per tensor (names distinct), the value vectors if computed."""

    format: Literal["patchlab.ParamDiff/1"]
    provenance: Provenance
    tensors: Annotated[list[TensorRow], Field(min_length=1)]
    value_vectors: Annotated[list[ValueVectorRow], Field(min_length=1)] | None

    @model_validator(mode="after")
    def _distinct(self) -> ParamDiffFile:
        seen: set[str] = set()
        for i, row in enumerate(self.tensors):
            if row.name in seen:
                raise bad(f"tensors[{i}].name", "tensor {name!r} has two rows", name=row.name)
            seen.add(row.name)
        return self


@register_result
@dataclass
class ParamDiff(Result):
    """Per-tensor statistics with pooled views per module type and per layer x module.

    Attributes:
        table: one row per tensor: ``name``, ``module``, ``layer`` (-1 outside layers), ``numel``, the pooled sums
            of :func:`tensor_stats` and the :data:`PARAM_METRICS` (also :meth:`to_frame`).
        provenance: the two checkpoints (source and weights digest) and the library versions
            (:func:`patchlab.provenance.pair_provenance`).
        value_vectors: the most changed MLP value vectors (:func:`value_vector_changes`), if computed; the report
            then writes them as ``value_vectors.csv``.
    """

    kind = "paramdiff"
    format = "patchlab.ParamDiff/1"
    schema = ParamDiffFile

    table: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)
    value_vectors: pd.DataFrame | None = None

    def _pooled(self, keys: list[str]) -> pd.DataFrame:
        sums = self.table.groupby(keys, as_index=False)[_SUMS].sum()
        return _metrics(sums)

    def to_frame(self) -> pd.DataFrame:
        """:attr:`table`: one row per tensor."""
        return self.table

    def by_module(self) -> pd.DataFrame:
        """The :data:`PARAM_METRICS` per module type, all layers pooled (as one concatenated vector)."""
        frame = self._pooled(["module"])
        frame["order"] = frame["module"].map({m: i for i, m in enumerate(MODULE_ORDER)})
        return frame.sort_values("order").drop(columns="order").reset_index(drop=True)

    def by_layer(self, metric: str = "cosine") -> pd.DataFrame:
        """``metric`` (one of :data:`PARAM_METRICS`) pooled per (layer, module type): a layer x module table."""
        if metric not in PARAM_METRICS:
            raise PatchlabValueError(f"metric must be one of {PARAM_METRICS}, got {metric!r}")
        pooled = self._pooled(["layer", "module"])
        table = pooled[pooled["layer"] >= 0].pivot(index="layer", columns="module", values=metric)
        return table[module_order(table.columns)]

    def tables(self) -> dict[str, pd.DataFrame]:
        """``paramdiff`` (:attr:`table`), ``paramdiff_modules`` (:meth:`by_module`), per metric
        ``paramdiff_layers_<metric>`` (:meth:`by_layer`), and ``value_vectors`` when computed."""
        tables = {self.kind: self.table, f"{self.kind}_modules": self.by_module()}
        tables.update({f"{self.kind}_layers_{m}": self.by_layer(m).reset_index() for m in PARAM_METRICS})
        if self.value_vectors is not None:
            tables["value_vectors"] = self.value_vectors
        return tables

    def figures(self) -> dict[str, go.Figure]:
        """``paramdiff_<metric>``: the heatmap (:meth:`figure`) of every metric of :data:`PARAM_METRICS`."""
        return {f"{self.kind}_{m}": self.figure(m) for m in PARAM_METRICS}

    def figure(self, metric: str = "one_minus_cos") -> go.Figure:
        """Interactive layer x module heatmap of ``metric``; :data:`LOG_METRICS` on a log colour scale
        (:func:`patchlab.reports.figures.layer_module_heatmap`)."""
        return super().figure(metric=metric)

    heatmap = figure

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": self.provenance, "tensors": self.table.to_dict("records"),
                "value_vectors": None if self.value_vectors is None else self.value_vectors.to_dict("records")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParamDiff:
        values = data["value_vectors"]
        return cls(pd.DataFrame(data["tensors"]), provenance=data["provenance"],
                   value_vectors=None if values is None else pd.DataFrame(values))


def paramdiff(vanilla: Any, unlearned: Any = None, *, progress: bool = True) -> ParamDiff:
    """Compare every parameter tensor of two models.

    Args:
        vanilla: a :class:`~patchlab.pair.ModelPair` (then ``unlearned`` is omitted), an in-memory model, or a
            checkpoint directory (safetensors, sharded or not; streamed one tensor at a time).
        unlearned: the other model or directory.

    Each tensor's module type comes from its family's :attr:`~patchlab.pair.arch.ArchSpec.module_types`
    (``other`` for a family that is not registered: :func:`patchlab.register_architecture` names them).

    Returns:
        A :class:`ParamDiff` recording both checkpoints (:func:`patchlab.provenance.pair_provenance`: a directory
        is identified by a hash of its safetensors files, a model by a hash of its weights).

    Raises:
        PairMismatchError: different tensor names or shapes.
        NonFiniteError: a tensor holds NaN or infinite values.
        PatchlabFileError: a directory is missing or holds no safetensors checkpoint.
    """
    if isinstance(vanilla, ModelPair):
        if unlearned is not None:
            raise PatchlabValueError("pass either a ModelPair or two models, not both")
        pair = vanilla
        vanilla, unlearned = pair.vanilla_hf, pair.unlearned_hf
    elif unlearned is None:
        raise PatchlabValueError("paramdiff needs two models (or a ModelPair)")
    else:
        pair = (vanilla, unlearned)
    a, b = _Source(vanilla, "vanilla"), _Source(unlearned, "unlearned")
    if a.shapes.keys() != b.shapes.keys():
        diff = sorted(a.shapes.keys() ^ b.shapes.keys())[:5]
        raise PairMismatchError(f"the two checkpoints hold different tensors, e.g. {diff}")
    arch = spec_for_type(a.model_type)
    rows = []
    for name in tqdm(sorted(a.shapes), desc="parameter diff", disable=not progress, leave=False):
        if a.shapes[name] != b.shapes[name]:
            raise PairMismatchError(f"tensor {name} has shape {a.shapes[name]} vs {b.shapes[name]}")
        layer = layer_index(name, arch)
        stats = tensor_stats(a.get(name), b.get(name))
        if not all(np.isfinite(v) for v in stats.values()):
            raise NonFiniteError(f"tensor {name} holds NaN or infinite values in the vanilla or unlearned model")
        module = arch.module_type(name) if arch else "other"
        rows.append({"name": name, "module": module, "layer": -1 if layer is None else layer,
                     "numel": int(np.prod(a.shapes[name])), **stats})
    return ParamDiff(_metrics(pd.DataFrame(rows)), provenance=pair_provenance(pair))


@torch.no_grad()
def value_vector_changes(pair: ModelPair, *, top: int = 10, top_tokens: int = 5) -> pd.DataFrame:
    """The ``top`` most changed MLP value vectors (columns of the down projections) across layers, by ``1 - cos``.

    Columns: layer, index (the column, i.e. the MLP neuron), cosine, one_minus_cos (:func:`one_minus_cos`, float64)
    and rel_l2 between the vanilla and unlearned vector, and the ``top_tokens`` tokens each vector promotes most in
    the vocabulary projection (unembedding matrix times the vector, Geva et al.).
    """
    if top < 1 or top_tokens < 1:
        raise PatchlabValueError("top and top_tokens must be >= 1")
    unembed = pair.vanilla_hf.get_output_embeddings().weight.float()
    rows = []
    for layer in range(pair.n_layers):
        v = pair.arch.value_weight(pair.vanilla_hf, layer).double()      # [d_model, d_mlp]
        u = pair.arch.value_weight(pair.unlearned_hf, layer).double()
        d = u - v
        norm_v2, norm_u2, diff2 = (v * v).sum(dim=0), (u * u).sum(dim=0), (d * d).sum(dim=0)  # [d_mlp] each
        change = one_minus_cos(norm_v2, norm_u2, diff2, (v * d).sum(dim=0))
        cos = (v * u).sum(dim=0) / (norm_v2 * norm_u2).sqrt()
        rel = diff2.sqrt() / norm_v2.sqrt().clamp(min=1e-12)
        for idx in torch.argsort(change.nan_to_num(nan=-1.0), descending=True)[:top].tolist():
            rows.append({"layer": layer, "index": idx, "cosine": float(cos[idx]),
                         "one_minus_cos": float(change[idx]), "rel_l2": float(rel[idx]),
                         "_v": v[:, idx].float(), "_u": u[:, idx].float()})
    rows = sorted(rows, key=lambda r: -r["one_minus_cos"] if np.isfinite(r["one_minus_cos"]) else 1.0)[:top]
    for r in rows:
        for side in ("v", "u"):
            ids = torch.topk(unembed @ r.pop(f"_{side}"), top_tokens).indices.tolist()
            r["top_tokens_" + ("vanilla" if side == "v" else "unlearned")] = [pair.tokenizer.decode([i]) for i in ids]
    return pd.DataFrame(rows)
