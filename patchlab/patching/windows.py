"""Layer windows in the style of ROME's causal tracing: a window of consecutive layers per centre layer."""

from __future__ import annotations

from patchlab.errors import PatchlabValueError

Window = tuple[int, int]  # half-open layer range [start, stop)


def window_label(window: tuple[int, int]) -> str:
    """The layers of a half-open window ``(start, stop)``, inclusive: ``"0-2"``, or ``"3"`` for one layer."""
    start, stop = window
    return str(start) if stop - start == 1 else f"{start}-{stop - 1}"



def sliding_windows(n_layers: int, window: int = 5, *, mode: str = "centered") -> list[Window]:
    """Windows of ``window`` consecutive layers, as half-open ``(start, stop)`` ranges.

    ``mode="centered"`` (the paper's code, after ROME): one window per centre layer ``c`` in ``0..L-1``,
    ``[c - window//2, c - window//2 + window)`` clipped to ``[0, L)``; e.g. ``window=5`` gives
    ``[c-2, c+2]`` inclusive, so windows at the ends are narrower. ``mode="fixed"``: every full-width window
    ``[s, s+window)`` for ``s`` in ``0..L-window``.

    Raises:
        PatchlabValueError: ``window`` is not in ``1..n_layers`` or ``mode`` is unknown.
    """
    if n_layers < 1:
        raise PatchlabValueError(f"the model must have at least one layer, got {n_layers}")
    if not isinstance(window, int) or not 1 <= window <= n_layers:
        raise PatchlabValueError(f"window must be an integer in 1..{n_layers} (the layer count), got {window!r}")
    if mode == "centered":
        return [(max(0, c - window // 2), min(n_layers, c - window // 2 + window)) for c in range(n_layers)]
    if mode == "fixed":
        return [(s, s + window) for s in range(n_layers - window + 1)]
    raise PatchlabValueError(f"window mode must be 'centered' or 'fixed', got {mode!r}")
