"""The ONNX backend's error: a scheme or graph ONNX cannot carry, or an export that failed."""

from __future__ import annotations

from lowc.errors import LowcError


class OnnxExportError(LowcError):
    """ONNX cannot express a layer's scheme (names the layer and scheme), or the export failed."""
