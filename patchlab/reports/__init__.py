"""The presentation layer: every figure (:mod:`patchlab.reports.figures`, plotly building blocks) and how each result
type and audit probe is drawn (:mod:`patchlab.reports.views`, registered with
:func:`patchlab.results.register_figure`). Importing this package registers the views; ``import patchlab`` does.
The result protocol, its registry and the partial-results flag are in :mod:`patchlab.results`.
"""

from patchlab.reports import figures, views

__all__ = ["figures", "views"]
