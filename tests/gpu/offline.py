"""The GPU check's offline folder, tests/gpu/offline/ (git-ignored), filled by tests/gpu/fetch.sh on a machine
with network so that tests/gpu/run.sh needs none. Standard library only: it runs before anything else is there.

  wheels/             pure-Python wheels the check may need and a bare GPU machine may lack (omegaconf, which
                      carries its own antlr4 runtime), and PyYAML built for a few CPython versions
  peer/mamba_ssm/     mamba_ssm's Triton SSD (`mamba_chunk_scan_combined`): ops/triton/ssd_combined.py and
                      every module it imports at module level, copied out of mamba_ssm's source distribution,
                      under a stub `mamba_ssm/__init__.py` holding only `__version__` (the real one imports the
                      CUDA extensions, which are never built)
  peer/peer.json      name, version, the sdist's file name and sha256, the files kept
  peer/LICENSE        mamba_ssm's license (Apache-2.0)

  python tests/gpu/offline.py vendor SDIST [--dest DIR]   keep the peer's files from a downloaded sdist
  python tests/gpu/offline.py site DIR [--all]            unpack into DIR the wheels this python lacks
  python tests/gpu/offline.py check                       what is missing or too big (exit 1 naming it)
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import platform
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
OFFLINE = HERE / "offline"
MAX_BYTES = 64 * 2**20            # what may travel with the checkout to the GPU machine, all of it together
PEER_PACKAGE = "mamba_ssm"
PEER_ENTRY = "mamba_ssm.ops.triton.ssd_combined"
STUB_INIT = '''"""Stub of mamba_ssm's package __init__, written by tests/gpu/offline.py: the real one imports mamba_ssm's
CUDA extensions (selective_scan, causal_conv1d), which the GPU check neither builds nor uses. Only the Triton SSD
(ops/triton/ssd_combined.py and its module-level imports) is kept beside this file."""
__version__ = {version!r}
'''


# ----------------------------------------------------------------------------- the peer, from its sdist

def module_closure(source: Callable[[str], Optional[str]], entry: str, package: str = PEER_PACKAGE) -> List[str]:
    """Modules of `package` that importing `entry` runs: its module-level imports (not those inside functions
    or try blocks, which mamba_ssm uses for optional CUDA extensions) and the __init__ of every package on the
    way, transitively. `source(module)` gives a module's text, or None when it is a package (then its __init__)."""
    seen, todo = [], [entry]
    while todo:
        mod = todo.pop()
        if mod in seen or mod == package:      # the root __init__ is replaced by the stub
            continue
        seen.append(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]      # parent packages' __init__
        text = source(mod)
        for node in ast.parse(text).body if text is not None else ():      # None: a namespace package
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            todo += [n for n in names if n.split(".")[0] == package and source(n) is not None]
    return sorted(seen)


def vendor(sdist: Path, dest: Path = OFFLINE / "peer") -> dict:
    """Copy the peer's pure-Python Triton SSD out of mamba_ssm's source distribution into dest (emptied first)."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}

        def read(path: str) -> Optional[str]:
            m = members.get(path)
            return None if m is None else tar.extractfile(m).read().decode()

        def path_of(mod: str) -> Optional[str]:
            base = mod.replace(".", "/")
            return next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in members), None)

        def source(mod: str) -> Optional[str]:
            p = path_of(mod)
            return None if p is None else read(p)

        if path_of(PEER_ENTRY) is None:
            raise SystemExit(f"{sdist.name}: no {PEER_ENTRY} in it; not mamba_ssm's source distribution?")
        info = read("PKG-INFO") or ""
        version = re.search(r"^Version: *(\S+)", info, re.M)
        if version is None:
            raise SystemExit(f"{sdist.name}: PKG-INFO names no Version")
        files = [path_of(m) for m in module_closure(source, PEER_ENTRY)]
        if dest.exists():
            for old in sorted(dest.rglob("*"), reverse=True):
                old.unlink() if old.is_file() else old.rmdir()
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_text(read(rel))
        (dest / PEER_PACKAGE / "__init__.py").write_text(STUB_INIT.format(version=version.group(1)))
        if read("LICENSE") is not None:
            (dest / "LICENSE").write_text(read("LICENSE"))
    manifest = dict(name=PEER_PACKAGE, version=version.group(1), sdist=sdist.name, sha256=digest, entry=PEER_ENTRY,
                    files=[f"{PEER_PACKAGE}/__init__.py (stub)"] + files)
    (dest / "peer.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def peer_manifest(offline: Path = OFFLINE) -> Optional[dict]:
    p = offline / "peer" / "peer.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------------------- wheels

def wheel_fits(name: str, version=sys.version_info, machine: str = platform.machine()) -> bool:
    """Whether a wheel file name's tags suit this interpreter: pure py3, or CPython's own on this Linux CPU."""
    m = re.match(r"^[^-]+-[^-]+(?:-\d[^-]*)?-([^-]+)-([^-]+)-([^-]+)\.whl$", name)
    if m is None:
        return False
    py, abi, plat = (t.split(".") for t in m.groups())
    cp = f"cp{version[0]}{version[1]}"
    python_ok = "py3" in py or cp in py
    abi_ok = "none" in abi or cp in abi or "abi3" in abi
    plat_ok = "any" in plat or any(p.startswith(("manylinux", "linux")) and p.endswith(machine) for p in plat)
    return python_ok and abi_ok and plat_ok


def wheel_modules(path: Path) -> List[str]:
    """Top-level import names a wheel provides."""
    with zipfile.ZipFile(path) as z:
        top = next((n for n in z.namelist() if n.endswith(".dist-info/top_level.txt")), None)
        if top is not None:
            return [s for s in z.read(top).decode().split() if s]
        names = {n.split("/", 1)[0] for n in z.namelist()}
    return sorted(n[:-3] if n.endswith(".py") else n for n in names if not n.endswith((".dist-info", ".data")))


def site(dest: Path, offline: Path = OFFLINE, everything: bool = False) -> Dict[str, str]:
    """Unpack into dest each wheel that fits this interpreter and provides a module it cannot import already
    (everything: all wheels that fit). The machine's own packages come first, as its torch and triton do.
    Returns {wheel: 'unpacked' | 'machine has <module>' | 'does not fit'}."""
    dest.mkdir(parents=True, exist_ok=True)
    done, provided = {}, set()
    for whl in sorted((offline / "wheels").glob("*.whl")):
        mods = wheel_modules(whl)
        if not wheel_fits(whl.name):
            done[whl.name] = "does not fit this python"
            continue
        have = [m for m in mods if m in provided or (not everything and importlib.util.find_spec(m) is not None)]
        if have:
            done[whl.name] = f"not needed: {have[0]} is importable"
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
        provided.update(mods)
        done[whl.name] = "unpacked"
    return done


# ----------------------------------------------------------------------------- the plan's files

def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check(offline: Path = OFFLINE) -> List[str]:
    """What is missing from the offline folder or too big; empty when run.sh has all it needs."""
    problems = []
    manifest = peer_manifest(offline)
    if manifest is None:
        problems.append(f"{offline}/peer/peer.json missing: run tests/gpu/fetch.sh on a machine with network")
    else:
        for f in manifest["files"]:
            if not (offline / "peer" / f.split(" ")[0]).is_file():
                problems.append(f"peer file {f} missing")
    wheels = [w.name for w in (offline / "wheels").glob("*.whl")] if (offline / "wheels").is_dir() else []
    if not any(w.lower().startswith("omegaconf-") for w in wheels):
        problems.append(f"{offline}/wheels has no omegaconf wheel: run tests/gpu/fetch.sh")
    size = folder_bytes(offline) if offline.is_dir() else 0
    if size >= MAX_BYTES:
        problems.append(f"{offline} holds {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB that may travel")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vendor", help="keep the peer's files from mamba_ssm's sdist")
    v.add_argument("sdist", type=Path)
    v.add_argument("--dest", type=Path, default=OFFLINE / "peer")
    s = sub.add_parser("site", help="unpack the wheels this python lacks")
    s.add_argument("dest", type=Path)
    s.add_argument("--all", action="store_true", help="every wheel that fits, importable or not")
    s.add_argument("--offline", type=Path, default=OFFLINE)
    c = sub.add_parser("check", help="what is missing or too big")
    c.add_argument("--offline", type=Path, default=OFFLINE)
    a = ap.parse_args(argv)
    if a.cmd == "vendor":
        m = vendor(a.sdist, a.dest)
        print(f"{m['name']} {m['version']}: {len(m['files'])} files, {folder_bytes(a.dest) / 2**10:.0f} KiB in {a.dest}")
    elif a.cmd == "site":
        for whl, what in site(a.dest, a.offline, a.all).items():
            print(f"{whl}: {what}")
    else:
        problems = check(a.offline)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"{a.offline}: complete, {folder_bytes(a.offline) / 2**20:.1f} MiB")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
