"""Frontend: capture models (modules, HF directories, presets, factories) into lowc Programs."""
