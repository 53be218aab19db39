"""Parameter diffs between a vanilla model and its unlearned copy: cosine similarity and relative L2 change of
every tensor, pooled per module type and per layer; streamed tensor by tensor from safetensors checkpoints so two
7B checkpoints never need to be in memory at once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from patchlab.pair.arch import spec_for_type
from patchlab.errors import NonFiniteError, PairMismatchError, PatchlabFileError, PatchlabValueError
from patchlab.io import OutputDir, output_dir, write_csv, write_html
from patchlab.pair.modules import MODULE_ORDER, layer_index, module_type
from patchlab.pair import ModelPair

CHUNK = 1 << 24  # elements per float64 chunk
METRICS = ("cosine", "rel_l2")


class _Source:
    """Named tensors of a model or of a safetensors checkpoint directory, loaded one at a time."""

    def __init__(self, source: Any, what: str):
        self.what = what
        if isinstance(source, PreTrainedModel):
            params = dict(source.named_parameters())
            self.shapes = {n: tuple(p.shape) for n, p in params.items()}
            self._get = lambda name: params[name].detach()
            self.model_type = source.config.model_type
        elif isinstance(source, (str, os.PathLike)):
            self._open_dir(Path(source))
        else:
            raise PatchlabValueError(f"{what} must be a PreTrainedModel or a checkpoint directory, got {type(source).__name__}")

    def _open_dir(self, root: Path) -> None:
        if not root.is_dir():
            raise PatchlabFileError(f"{self.what} checkpoint directory {str(root)!r} does not exist")
        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").exists():
            with safe_open(root / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise PatchlabFileError(f"{root} holds no safetensors checkpoint (model.safetensors or its index); "
                                    "re-save it with save_pretrained(..., safe_serialization=True)")
        self.shapes = {}
        for name, file in weight_map.items():
            with safe_open(root / file, "pt") as f:
                self.shapes[name] = tuple(f.get_slice(name).get_shape())
        self._get = lambda name: _load(root / weight_map[name], name)
        config = root / "config.json"
        self.model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def _load(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Sums that pool exactly across tensors: ``<a,b>``, ``|a|²``, ``|b|²``, ``|b-a|²`` (float64, chunked)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    out = dict(dot=0.0, norm_a2=0.0, norm_b2=0.0, diff2=0.0)
    for i in range(0, fa.numel(), CHUNK):
        x, y = fa[i:i + CHUNK].double(), fb[i:i + CHUNK].double()
        out["dot"] += float(x @ y)
        out["norm_a2"] += float(x @ x)
        out["norm_b2"] += float(y @ y)
        out["diff2"] += float((y - x) @ (y - x))
    return out


def _metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``cosine = <a,b>/(|a||b|)`` and ``rel_l2 = |b-a|/|a|`` columns from the pooled sums."""
    frame = frame.copy()
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero tensors give NaN / inf
        frame["cosine"] = frame["dot"] / np.sqrt(frame["norm_a2"] * frame["norm_b2"])
        frame["rel_l2"] = np.sqrt(frame["diff2"] / frame["norm_a2"])
    return frame


@dataclass
class ParamDiff:
    """Per-tensor statistics (``table``: name, module, layer (-1 outside layers), numel, the pooled sums, cosine,
    rel_l2) with pooled views per module type and per layer x module."""

    table: pd.DataFrame

    def _pooled(self, keys: list[str]) -> pd.DataFrame:
        sums = self.table.groupby(keys, as_index=False)[["numel", "dot", "norm_a2", "norm_b2", "diff2"]].sum()
        return _metrics(sums)

    def by_module(self) -> pd.DataFrame:
        """Cosine and relative L2 change per module type, all layers pooled (as one concatenated vector)."""
        frame = self._pooled(["module"])
        frame["order"] = frame["module"].map({m: i for i, m in enumerate(MODULE_ORDER)})
        return frame.sort_values("order").drop(columns="order").reset_index(drop=True)

    def by_layer(self, metric: str = "cosine") -> pd.DataFrame:
        """``metric`` (cosine or rel_l2) pooled per (layer, module type): a layer x module table."""
        if metric not in METRICS:
            raise PatchlabValueError(f"metric must be one of {METRICS}, got {metric!r}")
        pooled = self._pooled(["layer", "module"])
        table = pooled[pooled["layer"] >= 0].pivot(index="layer", columns="module", values=metric)
        return table[[m for m in MODULE_ORDER if m in table.columns]]

    def write_report(self, out_dir: str | os.PathLike | OutputDir, *, value_vectors: pd.DataFrame | None = None,
                     overwrite: bool = False) -> list[Path]:
        """Write ``paramdiff.csv`` (:attr:`table`), ``paramdiff_modules.csv`` (:meth:`by_module`), and per metric
        ``paramdiff_layers_<metric>.csv`` (:meth:`by_layer`) and ``paramdiff_<metric>.html`` (:meth:`heatmap`),
        plus ``value_vectors.csv`` when given (:func:`value_vector_changes`), each atomically; returns the paths.
        ``out_dir`` is claimed as a ``"paramdiff"`` output (:class:`patchlab.io.OutputDir`)."""
        out = output_dir(out_dir, "paramdiff", overwrite=overwrite)
        paths = [write_csv(self.table, out.file("paramdiff.csv")),
                 write_csv(self.by_module(), out.file("paramdiff_modules.csv"))]
        for metric in METRICS:
            paths.append(write_csv(self.by_layer(metric).reset_index(), out.file(f"paramdiff_layers_{metric}.csv")))
            paths.append(write_html(self.heatmap(metric), out.file(f"paramdiff_{metric}.html")))
        if value_vectors is not None:
            paths.append(write_csv(value_vectors, out.file("value_vectors.csv")))
        return paths

    def heatmap(self, metric: str = "cosine") -> go.Figure:
        """Interactive layer x module heatmap of ``metric``."""
        table = self.by_layer(metric)
        fig = go.Figure(go.Heatmap(z=table.values, x=list(table.columns), y=list(table.index), colorscale="Viridis",
                                   colorbar={"title": metric},
                                   hovertemplate="layer %{y}<br>%{x}<br>" + metric + " %{z:.6f}<extra></extra>"))
        fig.update_layout(title=f"Parameter {metric} between vanilla and unlearned, per layer and module",
                          xaxis_title="module", yaxis_title="layer")
        return fig


def paramdiff(vanilla: Any, unlearned: Any = None, *, progress: bool = True) -> ParamDiff:
    """Compare every parameter tensor of two models.

    Args:
        vanilla: a :class:`~patchlab.pair.ModelPair` (then ``unlearned`` is omitted), an in-memory model, or a
            checkpoint directory (safetensors, sharded or not; streamed one tensor at a time).
        unlearned: the other model or directory.

    Raises:
        PairMismatchError: different tensor names or shapes.
        NonFiniteError: a tensor holds NaN or infinite values.
        PatchlabFileError: a directory is missing or holds no safetensors checkpoint.
    """
    if isinstance(vanilla, ModelPair):
        if unlearned is not None:
            raise PatchlabValueError("pass either a ModelPair or two models, not both")
        vanilla, unlearned = vanilla.vanilla_hf, vanilla.unlearned_hf
    if unlearned is None:
        raise PatchlabValueError("paramdiff needs two models (or a ModelPair)")
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
        rows.append({"name": name, "module": module_type(name), "layer": -1 if layer is None else layer,
                     "numel": int(np.prod(a.shapes[name])), **stats})
    return ParamDiff(_metrics(pd.DataFrame(rows)))


@torch.no_grad()
def value_vector_changes(pair: ModelPair, *, top: int = 10, top_tokens: int = 5) -> pd.DataFrame:
    """The ``top`` most changed MLP value vectors (columns of the down projections) across layers.

    Columns: layer, index (the column, i.e. the MLP neuron), cosine and rel_l2 between the vanilla and unlearned
    vector, and the ``top_tokens`` tokens each vector promotes most in the vocabulary projection (unembedding
    matrix times the vector, Geva et al.).
    """
    if top < 1 or top_tokens < 1:
        raise PatchlabValueError("top and top_tokens must be >= 1")
    unembed = pair.vanilla_hf.get_output_embeddings().weight.float()
    rows = []
    for layer in range(pair.n_layers):
        v = pair.arch.value_weight(pair.vanilla_hf, layer).float()      # [d_model, d_mlp]
        u = pair.arch.value_weight(pair.unlearned_hf, layer).float()
        cos = torch.nn.functional.cosine_similarity(v, u, dim=0)
        rel = (u - v).norm(dim=0) / v.norm(dim=0).clamp(min=1e-12)
        for idx in torch.argsort(cos)[:top].tolist():
            rows.append({"layer": layer, "index": idx, "cosine": float(cos[idx]), "rel_l2": float(rel[idx]),
                         "_v": v[:, idx], "_u": u[:, idx]})
    rows = sorted(rows, key=lambda r: r["cosine"])[:top]
    for r in rows:
        for side in ("v", "u"):
            ids = torch.topk(unembed @ r.pop(f"_{side}"), top_tokens).indices.tolist()
            r["top_tokens_" + ("vanilla" if side == "v" else "unlearned")] = [pair.tokenizer.decode([i]) for i in ids]
    return pd.DataFrame(rows)
