"""patchlab's version (also in pyproject.toml), recorded in every result's provenance."""

__version__ = "0.1.0"
