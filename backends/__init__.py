"""lowc backends: targets, the reference backend (the oracle), and (in later modules) Triton,
CPU-LUT and ONNX. Heavy dependencies are imported only inside the backend that needs them."""
