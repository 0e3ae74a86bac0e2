"""lowc's version: one place, read by the package, the API (manifests) and the CLI (--version)."""

__version__ = "0.1.0"
