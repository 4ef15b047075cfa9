"""The training machinery the DiT trainer (:mod:`latentdit.training`) and VAE training
(:mod:`latentdit.vae.training`) share.

- :mod:`~latentdit.engine.accelerator`: the accelerator (devices, processes, mixed precision), TF32, the
  gradient average of processes that do not wrap their model in DDP;
- :mod:`~latentdit.engine.optim`: AdamW without weight decay on norms, biases and embeddings;
- :mod:`~latentdit.engine.schedule`: warm-up then cosine (or constant) learning rate;
- :mod:`~latentdit.engine.checkpoint`: atomic checkpoints, resume lookup, the config check of a resume;
- :mod:`~latentdit.engine.rng`: RNG states saved with every checkpoint;
- :mod:`~latentdit.engine.runlog`: ``metrics.jsonl``, TensorBoard and the progress bar;
- :mod:`~latentdit.engine.budget`: the ``max_minutes`` time budget, agreed across processes.
"""
