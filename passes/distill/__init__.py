"""Cross-architecture distillation passes: attention layers into state-space (Mamba-2 / SSD) mixers.

* :mod:`.distill_ssm` - the ``distill_ssm`` pass (MOHAWK: options, orchestration);
* :mod:`.hooks` - capture a float teacher's tensors block by block (attention q/k/v and matrices,
  block inputs/outputs) and replay blocks of a student on them: reusable by other distillation recipes;
* :mod:`.ssm` - the student mixer: initialisation from attention and the graph rewrite into ``lowc::ssd``;
* :mod:`.train` - the three stages (matrix orientation, hidden-state alignment, end-to-end KL).

Decoding a distilled model with constant-size state is the runtime's job (:mod:`lowc.runtime.recurrent`).
"""
