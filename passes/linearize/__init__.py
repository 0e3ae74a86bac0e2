"""Attention linearization passes (Hedgehog, LoLCATs): replace softmax attention with learned
feature-map linear attention (``lowc::linear_attention``).

* :mod:`.linearize` - the ``linearize`` pass (options, orchestration);
* :mod:`.maps` - the feature maps and the linearized attention, one ATen definition for graph and trainer;
* :mod:`.rewrite` - finding attentions (causality, GQA layout, padding) and the graph rewrite;
* :mod:`.train` - attention transfer (step 1) and LoRA (step 2).

Decoding a linearized model with constant-size state is the runtime's job (:mod:`lowc.runtime.recurrent`,
``lowc generate``); nothing here imports it.
"""
