"""The machinery every stage trains with, free of any stage's logic.

- `flat`    — the flat trainable-parameter vector: layout, flattening, parameters bound to views of one buffer;
- `task`    — a *task* (model, data, θ0, projection) built from a config with no Ray session, the pure
              `loss_and_projected_grad(task, z, batch)`, and the one training step, `train_step`, every loop uses;
- `loop`    — per-worker pieces: rank/world, data order, all-reduce, evaluation, Ray Train/Tune report and
              checkpoint, divergence records;
- `cluster` — the driver's side of Ray: start or join a cluster, build a TorchTrainer, relay progress;
- `reaper`  — the process that kills what a local Ray cluster leaves once its driver is gone.
"""
