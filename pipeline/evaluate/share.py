"""Evaluation work split over ranks: each rank computes its share of independent items (passkey and niah
batches, each variant's rows of loss against position, the variants of the state statistics) and every rank gets
all results back, in order. The items are the ones a single process would compute, each computed the same way,
so the results equal one process's.

Under ZeRO-3 every forward needs every rank (parameters are gathered layer by layer), so the trainer
gives each rank the whole work there (`everything`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional


@dataclass
class RankShare:
    rank: int = 0
    world: int = 1
    all_gather: Optional[Callable[[List[Any], Any], None]] = None   # torch.distributed.all_gather_object
    # item i goes to rank (i + offset) % world; each gather moves the offset on, so successive evaluations
    # continue the round-robin where the previous one stopped (no rank gets every first item)
    offset: int = 0

    def rounds(self, items: int) -> int:
        """Rounds every rank goes through for `items` items (the same on every rank: collectives such as
        a stop check may run once per round)."""
        return -(-(items + self.offset) // self.world)

    def item(self, round_: int) -> int:
        """The item this rank computes in a round (outside 0..items-1: nothing to do)."""
        return round_ * self.world + self.rank - self.offset

    def mine(self, items: int) -> List[int]:
        return [i for i in range(items) if (i + self.offset) % self.world == self.rank]

    def owner(self, item: int) -> int:
        return (item + self.offset) % self.world

    def gather(self, mine: Dict[int, Any], items: int) -> List[Any]:
        """Every item's result, in item order, from each rank's {item: result} (a collective)."""
        if self.world == 1:
            return [mine[i] for i in range(items)]
        parts: List[Any] = [None] * self.world
        self.all_gather(parts, mine)
        self.offset = (self.offset + items) % self.world
        merged = {k: v for part in parts for k, v in part.items()}
        return [merged[i] for i in range(items)]


EVERYTHING = RankShare()       # one process, or every rank computing everything (its offset stays 0)


def from_distributed(dist, zero_stage: int) -> RankShare:
    if not dist.is_initialized() or dist.get_world_size() == 1 or zero_stage >= 3:
        return EVERYTHING
    return RankShare(dist.get_rank(), dist.get_world_size(), dist.all_gather_object)
