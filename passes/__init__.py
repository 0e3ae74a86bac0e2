"""lowc passes: the pass contract, the registry, the pipeline, calibration, and the method passes."""
