"""Training: the per-rank loop (`trainer`) and its parts: the process's place in the job, the
non-finite retake, the curriculum plan, checkpoints and the trainer state they hold, the
stage's mitigations, the evaluation at checkpoints, the token loss, metrics and the run report.
The LR decays by name are `longctx.pipeline.schedule`, beside the config that names them."""
