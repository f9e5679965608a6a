"""Training: the per-rank loop (`trainer`) and its parts: the curriculum plan and LR schedule,
checkpoints, the stage's mitigations, the evaluation at checkpoints, the token loss, metrics
and the run report. Nothing is imported here, so the config may use `schedule` cheaply."""
