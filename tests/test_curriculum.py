"""Stage planning and the LR schedule (no processes started)."""
import math

import pytest

from longctx.pipeline.config import ConfigError, load_config
from longctx.pipeline.training.curriculum import format_plan, learning_rate, plan, stage_at


def cfg(tmp_path, stages, micro=1, extra=""):
    p = tmp_path / "c.yaml"
    p.write_text(f"train: {{micro_batch_size: {micro}}}\n{extra}curriculum:\n  stages:\n" +
                 "".join(f"    - {s}\n" for s in stages))
    return load_config(p)


def test_plan_keeps_tokens_per_step_and_replans_accumulation(tmp_path):
    c = cfg(tmp_path, ["{name: a, seq_len: 256, steps: 10, global_batch_tokens: 4096, warmup_steps: 2}",
                       "{name: b, seq_len: 1024, tokens: 20000, global_batch_tokens: 4096, lr: 1.0e-4}"])
    a, b = plan(c, world_size=2, chunk_size=256)
    assert (a.sequences_per_step, a.data_parallel, a.grad_accum) == (16, 2, 8)
    assert (b.sequences_per_step, b.grad_accum, b.steps, b.first_step) == (4, 2, 5, 10)   # ceil(20000 / 4096)
    assert stage_at([a, b], 9) is a and stage_at([a, b], 10) is b
    text = format_plan([a, b], 2)
    assert "1024" in text and "15 steps" in text


@pytest.mark.parametrize("stage,world,match", [
    ("{name: x, seq_len: 300, steps: 1, global_batch_tokens: 600}", 1, r"stages\[0\] \(x\).seq_len: 300 must be a multiple"),
    ("{name: x, seq_len: 256, steps: 1, global_batch_tokens: 256, seq_parallel: 2}", 2, r"seq_len: 256 must be a multiple of seq_parallel x chunk_size \(2 x 256\)"),
    ("{name: x, seq_len: 512, steps: 1, global_batch_tokens: 512, seq_parallel: 2}", 3, r"seq_parallel: world size 3 is not divisible"),
    ("{name: x, seq_len: 512, steps: 1, global_batch_tokens: 512, seq_parallel: 2, mitigations: {state_norm: {every: 256}}}",
     2, r"\(x\).seq_parallel: 2 with state norm on: mitigations.state_norm is not supported"),
    ("{name: x, seq_len: 256, steps: 1, global_batch_tokens: 768}", 2, r"global_batch_tokens: 3 sequences"),
    ("{name: x, seq_len: 256, steps: 1, global_batch_tokens: 256, warmup_steps: 5}", 1, r"warmup_steps"),
    ("{name: x, seq_len: 256, steps: 0, global_batch_tokens: 256}", 1, r"\(x\).steps"),
])
def test_impossible_plans_are_refused_naming_the_field(tmp_path, stage, world, match):
    with pytest.raises(ConfigError, match=match):
        plan(cfg(tmp_path, [stage]), world_size=world, chunk_size=256)


def test_sequence_parallel_stages_plan_data_parallel_over_the_rest(tmp_path):
    c = cfg(tmp_path, ["{name: a, seq_len: 1024, steps: 2, global_batch_tokens: 8192}",
                       "{name: b, seq_len: 4096, steps: 2, global_batch_tokens: 8192, seq_parallel: 4}"])
    a, b = plan(c, world_size=4, chunk_size=256)
    assert (a.seq_parallel, a.data_parallel, a.grad_accum) == (1, 4, 2)
    assert (b.seq_parallel, b.data_parallel, b.sequences_per_step, b.grad_accum) == (4, 1, 2, 2)


def test_lr_schedule_warms_up_decays_and_continues_across_stages(tmp_path):
    c = cfg(tmp_path, ["{name: a, seq_len: 256, steps: 10, global_batch_tokens: 256, lr: 1.0, warmup_steps: 2, "
                       "decay: cosine, min_lr_ratio: 0.1}",
                       "{name: b, seq_len: 256, steps: 10, global_batch_tokens: 256, lr: 0.5, warmup_steps: 5, "
                       "decay: linear, min_lr_ratio: 0.0}",
                       "{name: c, seq_len: 256, steps: 10, global_batch_tokens: 256, lr: 0.2, decay: wsd, min_lr_ratio: 0.5}"])
    plans = plan(c, 1, 256)
    lrs = [learning_rate(plans, s) for s in range(30)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)          # warmup
    assert all(x >= y for x, y in zip(lrs[1:10], lrs[2:10]))                       # cosine decay
    assert lrs[9] > 0.1 and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lrs[10] == pytest.approx(0.1 + (0.5 - 0.1) / 5)                         # warmup from stage a's end
    assert lrs[14] == pytest.approx(0.5)
    assert lrs[19] == pytest.approx(0.5 * (1 - 4 / 5))                            # linear
    assert lrs[20:28] == [pytest.approx(0.2)] * 8 and lrs[29] < 0.2               # wsd: stable, then decay
