"""Sequence parallelism by state passing, and the distributed runtime's housekeeping."""
from .sequence import Groups, SequenceParallel, StatePass, halo

__all__ = ["Groups", "SequenceParallel", "StatePass", "halo"]
