"""`sdd bench`: the project's fast paths timed against the plain PyTorch way, in one process and one run.

Every figure is a ratio of two quantities measured in the same run, with project and baseline repeats
interleaved (their order rotating) so that load from other processes hits both alike; medians
over the repeats are reported. Absolute numbers are printed for context only: on a shared machine
they move, the ratios much less.

1. training throughput: `sdd.training.fit` (data resident on the device, batched `sdd.augment`)
   against `sdd.bench.baseline` (DataLoader, per-sample torchvision transforms), same model, optimizer,
   batch size and initial weights;
2. the cost of masking: a model at 90% sparsity against the same model dense, in the project's loop
   (masks multiplied in after each step) and in the baseline's (torch.nn.utils.prune);
3. MLflow logging and evaluation as a share of the wall time of the quick preset's recipe, and
   `log_batch` (MetricLogger) against one `log_metric` call per metric;
4. orchestration: small trainings as a Ray Tune sweep (`sdd.sweep.run.run_sweep` on a tiny study file)
   against the same trainings one after another (`sdd.dense.run_train` in a loop, one core); and the quick
   preset's dense grid scaled down as a sweep on N cores against N plain PyTorch processes
   (`baseline.train_grid_share`) training the same grid;
5. bytes of a level artifact (`save_sparse`) against the dense model's (`save_state`);
6. CUDA only: throughput with bf16 autocast + channels_last on and off, and trials sharing one GPU.
7. seed packs: K seeds of one config as one vmapped model (`sdd.packs.fit_pack`) against the same seeds
   trained one after another by `sdd.training.fit` (MLP full batch and minibatch, cnn1d, cnn5), whether
   the auto rule (`sdd.packs.pack_pays`) packs each case and how often its choice is the faster one; on
   CUDA, packs of 16 small models against 16 separate trainings.

The package is no part of the library: only the `sdd bench` command (its options are in sdd/cli.py)
imports it. Its modules: `suite` (every section into one report), `loops` (items 1, 2, 6), `runs`
(items 3, 4, 5), `packs` (item 7), `context` (sizes, preset, data), `measure` (timing), `report` (table and JSON),
`baseline` (the plain loop).
"""
