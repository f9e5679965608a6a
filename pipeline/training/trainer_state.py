"""What a checkpoint holds beside DeepSpeed's state (`checkpoint.py` writes it, `Checkpointer.load` and
`load_rank_state` read it back): the trainer state of trainer_state.json (the step counters, the stage,
the loaders' positions, every RNG, the stages' mitigations, the run's identity and id) and each rank's
own part (its rows' carried states). Built here for saving and put back here on resume, so that a
resumed run continues exactly where the uninterrupted one would be."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from ..model.carry import CarriedStates


def seed_rngs(seed: int) -> None:
    """Seeds every RNG the process uses: the ones `rng_state` records."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the process uses, as JSON-friendly lists (stored in trainer_state.json too)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(saved: dict) -> None:
    """Puts every RNG back as `rng_state` recorded it."""
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))


def trainer_state(counters: dict, stage, *, stream, eval_stream, mitigations, identity: dict, run_id: str,
                  pending: Optional[dict] = None) -> dict:
    """trainer_state.json at the end of a step of `stage`: `counters` (step, tokens, ...), the loaders'
    positions, the RNGs, the stages' mitigations, the run's identity and id, and `pending`, the step
    record of a stop whose evaluation is still to run."""
    return {**counters, "stage": stage.index, "stage_name": stage.name, "seq_len": stage.seq_len,
            "loader": stream.state_dict(),
            "eval_loader": None if eval_stream is None else eval_stream.state_dict(),
            "rng": rng_state(),
            "mitigations": mitigations.state_dict(), "identity": identity, "pending": pending,
            "run_id": run_id}


def load_trainer_state(saved: dict, *, stream, eval_stream, mitigations) -> None:
    """Puts the loaders, the stages' mitigations and the RNGs back as `trainer_state` recorded them
    (the counters and `pending` are the trainer's to take)."""
    stream.load_state_dict(saved["loader"])
    if eval_stream is not None:
        eval_stream.load_state_dict(saved["eval_loader"])
    mitigations.load_state_dict(saved.get("mitigations", {}))
    set_rng_state(saved["rng"])


def rank_state(rank: int, carried: Optional[CarriedStates], stage_of_carried: Optional[int]) -> Optional[tuple]:
    """(rank, what only this rank holds: its rows' carried states), or None when nothing is carried."""
    if carried is None:
        return None
    return rank, {"stage": stage_of_carried, "carried": carried.state_dict()}


def carried_from_rank_state(saved: Optional[dict], saved_world: int, world: int, device: torch.device,
                            is_rank0: bool) -> tuple:
    """(carried states, their stage) from what `rank_state` saved, or (None, None): nothing saved, or it
    was saved in another world size."""
    if saved is not None and saved_world != world:
        saved = None                     # rows are laid out over another world: the stage's states restart
        if is_rank0:
            print("resume: the world size changed; carried states start again from zeros", flush=True)
    if saved is not None and saved.get("carried") is not None:
        return CarriedStates.from_state_dict(saved["carried"], device), saved["stage"]
    return None, None
