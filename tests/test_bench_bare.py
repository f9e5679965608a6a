"""`longctx bench train --vs-bare`: the bare loop runs the same plan as the trainer, carried state included."""
import dataclasses

import pytest

from longctx.pipeline.bench.bare import WARMUP_STEPS, bare_tokens_per_s, stage_override
from longctx.pipeline.config import load_config, model_config
from longctx.pipeline.model import Mamba2LM
from longctx.pipeline.training.curriculum import plan


@pytest.mark.timeout(300)
@pytest.mark.parametrize("carry", ["none", "document"])
def test_the_bare_loop_carries_state_where_the_stage_does(monkeypatch, carry):
    """A stage with carry_state: each bare micro-batch starts from the previous one's final state (the trainer's
    work, timed on both sides); without it, from zeros."""
    cfg = load_config("configs/demo-from-scratch.yaml")
    stage = dict(dataclasses.asdict(cfg.curriculum.stages[1]), seq_parallel=1, seq_len=128,
                 global_batch_tokens=256, carry_state=carry)
    stage = {k: v for k, v in stage.items() if v is not None and v != {}}
    steps = WARMUP_STEPS + 2
    cfg = load_config("configs/demo-from-scratch.yaml", [stage_override(stage, steps), "train.micro_batch_size=1"])
    p = plan(cfg, 1, cfg.model.chunk_size, "demo")[0]
    assert p.grad_accum == 2
    entered = []
    set_carried = Mamba2LM.set_carried
    monkeypatch.setattr(Mamba2LM, "set_carried",
                        lambda self, layers: entered.append(layers) or set_carried(self, layers))
    assert bare_tokens_per_s(model_config(cfg), 1, p, steps, 1.0, 0.1) > 0
    if carry == "none":
        assert entered == []
    else:
        assert len(entered) == steps * p.grad_accum
        assert all(c.state is None for c in entered[0])                  # the first micro-batch: zeros
        assert all(c.state is not None and c.tail is not None for layers in entered[1:] for c in layers)
