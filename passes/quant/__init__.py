"""Quantization method passes (RTN; GPTQ, SmoothQuant, AffineQuant, FlatQuant in later work) and
activation-quantization lowering."""
