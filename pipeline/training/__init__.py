"""Training: the per-rank loop (`trainer`) and its parts: the curriculum plan, checkpoints, the
stage's mitigations, the evaluation at checkpoints, the token loss, metrics and the run report.
The LR decays by name are `longctx.pipeline.schedule`, beside the config that names them."""
