"""lowc IR: the exported ATen FX graph plus typed lowc metadata, its printer, verifier and analyses."""

from lowc.ir.program import InputSpec, ModelInfo, Program

__all__ = ["Program", "ModelInfo", "InputSpec"]
