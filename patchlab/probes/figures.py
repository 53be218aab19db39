"""Plotting helpers shared by the probes' figures: one colour per audited pair, curves with confidence bands."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.colors
import plotly.graph_objects as go

from patchlab.probes.base import Interval

PALETTE = plotly.colors.qualitative.D3


def colour(i: int, alpha: float = 1.0) -> str:
    """The ``i``-th pair's colour as ``rgba(...)``."""
    r, g, b = plotly.colors.hex_to_rgb(PALETTE[i % len(PALETTE)])
    return f"rgba({r},{g},{b},{alpha})"


def curve(x: Sequence, intervals: Sequence[Interval], *, name: str, index: int, dash: str = "solid",
          hover: Sequence[str] | None = None, group: str | None = None, showlegend: bool = True
          ) -> list[go.Scatter]:
    """A line through the interval values with a shaded band between their bounds (the band is skipped where a
    bound is NaN). ``hover``: one extra line of hover text per point."""
    x = list(x)
    values = [iv.value for iv in intervals]
    text = [f"{name}<br>{iv.format(3)}" + (f"<br>{h}" if hover else "")
            for iv, h in zip(intervals, hover or [""] * len(x))]
    band = go.Scatter(x=x + x[::-1], y=[iv.high for iv in intervals] + [iv.low for iv in intervals][::-1],
                      mode="lines", fill="toself", fillcolor=colour(index, 0.15), line={"width": 0}, hoverinfo="skip",
                      showlegend=False, legendgroup=group or name)
    line = go.Scatter(x=x, y=values, mode="lines+markers", name=name, legendgroup=group or name,
                      line={"color": colour(index), "dash": dash}, marker={"size": 8}, text=text,
                      hovertemplate="%{text}<extra></extra>", showlegend=showlegend)
    return [band, line]
