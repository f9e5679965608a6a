"""The configuration reference in docs/configuration.md, generated from the config dataclasses.

`python -m longctx.pipeline.config_reference` prints it; a test checks that docs/configuration.md carries
exactly this text between its markers, so the documentation cannot drift from the code.
Each key's description is the comment on its line in the dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Dict, List

from .config import Config, StageConfig

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _comments(cls) -> Dict[str, str]:
    """field name -> the comment on its line, or the comment lines just above it."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: List[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            m = re.match(r"(\w+)\s*:[^#]*(?:#(.*))?$", text)
            if m and not text.startswith(("def ", "@", '"""')):
                note = (m.group(2) or "").strip() or " ".join(above)
                if note:
                    out[m.group(1)] = note
            above = []
    return out


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str) and value == "???":
        return "required"
    text = repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")


def _rows(cls, prefix: str) -> List[str]:
    notes = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += _rows(type(default), key + ".")
            continue
        rows.append(f"| `{key}` | `{_default(f)}` | {notes.get(f.name, '').replace('|', '/')} |")
    return rows


def reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        section = f.default_factory()
        lines += _rows(type(section), f"{f.name}.")
    lines += ["", "Each entry of `curriculum.stages`:", "", "| key | default | meaning |", "|---|---|---|"]
    lines += _rows(StageConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
