"""The LowcError family: every error a user can cause, with a one-line message naming what is at fault.

The CLI prints these without a traceback (``--debug`` shows it). Anything that is not a LowcError
escaping to the CLI is a bug in lowc and is shown with its traceback.
"""

from __future__ import annotations


class LowcError(Exception):
    """Base class: a user-facing error with a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))


class ModelLoadError(LowcError):
    """The model (directory, preset, factory) could not be found or loaded."""


class CaptureError(LowcError):
    """torch.export could not capture the model."""


class InputError(LowcError, TypeError):
    """A compiled model was called with inputs it does not take (also a TypeError, as Python's own
    complaint about call arguments is)."""


class UnknownTargetError(LowcError):
    """A target name that no backend provides."""


class PassOptionError(LowcError):
    """A pass spelling, option name or option value is invalid."""


class PassError(LowcError):
    """A pass failed while running (names the pass and those that ran before it)."""


class VerificationError(LowcError):
    """The IR failed verification."""


class CalibrationError(LowcError):
    """Calibration data is missing or unusable."""


class DataError(LowcError):
    """A text argument (calibration or evaluation text) is neither a file nor a built-in text name."""


class ArtifactError(LowcError):
    """An artifact directory is missing, corrupt, of another format version, or would be overwritten."""


class KernelError(LowcError):
    """A kernel cannot take the given shapes or dtypes."""


class DeviceError(LowcError):
    """A device this machine does not have (CUDA without a GPU) or an unknown device string."""


class GenerationError(LowcError):
    """A model cannot generate as asked: not a causal LM, a decoding strategy that does not apply to its
    graph, or invalid sampling options."""


class ExportError(LowcError):
    """A compiled model cannot be written in the export format asked for (a layer the format has no
    entry for, a model that is not a Hugging Face model)."""


class DistributedError(LowcError):
    """A distributed run cannot start or finish: Ray is not installed, the cluster cannot be reached or
    has too few CPUs, or its workers keep dying."""
