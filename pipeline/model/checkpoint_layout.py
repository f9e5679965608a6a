"""Which training checkpoints a directory holds, and which of them are complete: what the trainer writes
(longctx.pipeline.training.checkpoint) and what loading a model from a checkpoint reads (`load`).

Layout (docs/ARCHITECTURE.md §6): checkpoints/step_XXXXXXX/ (its files, then COMPLETE.json last),
checkpoints/latest (the tag of the newest complete checkpoint).

A checkpoint counts only when its COMPLETE.json exists and every file it lists has the size it
records: the marker is written after every rank has written its part, so a save cut short (a
kill, a full disk, a lost node) leaves a directory without one, and a file truncated or removed
later no longer matches.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

LATEST = "latest"
MARKER = "COMPLETE.json"
PREFIX = "step_"


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def marker_files(d: Path) -> Dict[str, int]:
    """What the marker of checkpoint directory `d` lists: every file in it (but the marker) and its size."""
    return {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")}


def incomplete_reason(d: Path) -> Optional[str]:
    """None when the checkpoint directory `d` is complete, else why not (for the warning)."""
    marker = d / MARKER
    if not marker.exists():
        return f"{d.name}: no {MARKER} (the save did not finish)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{d.name}: {MARKER} is unreadable ({e})"
    for name, size in listed.items():
        path = d / name
        if not path.is_file():
            return f"{d.name}: {name} is missing"
        if path.stat().st_size != size:
            return f"{d.name}: {name} is {path.stat().st_size} bytes, the marker says {size}"
    return None


def step_dirs(root: Path) -> List[Path]:
    """step_* directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)


def newest_complete(root: Path) -> Tuple[Optional[str], List[str]]:
    """(tag of the newest complete checkpoint or None, what was skipped and why)."""
    root = Path(root)
    skipped = []
    latest = root / LATEST
    if latest.exists():
        named = latest.read_text().strip()
        if not (root / named).is_dir() or not named.startswith(PREFIX):
            skipped.append(f"{LATEST} names {named!r}, which is not a checkpoint here")
    for d in step_dirs(root):
        reason = incomplete_reason(d)
        if reason is None:
            return d.name, skipped
        skipped.append(reason)
    return None, skipped
