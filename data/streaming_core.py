"""mosaicml-streaming's modules, imported without the package's dataset zoo.

`import streaming` (and any `from streaming.base... import`) first runs streaming/__init__.py and
streaming/base/__init__.py, which import streaming's example datasets (`streaming.text`, `.vision`,
`.multimodal`) and its DataLoader, and with them transformers and torchvision: ~3-4 s of CPU in every process
that reads or writes shards (each rank of a run, each Ray worker of a prepare, each evaluation), for nothing
longctx uses. Here those two packages are registered with their `__init__` not yet run, so Python imports
only the submodules asked for (the dataset, the MDS writer, shared memory: ~0.1 s). The first use of a name
their `__init__` defines (`streaming.StreamingDataset`, `__version__`, by a user's code in the same process)
runs it then: the full package, as if imported normally. Other names are simply absent (a probe such as
pickle's scan of every module imports nothing). A process that imported streaming before keeps it as it is.

Every import of streaming in longctx goes through `streaming_module` (an import-linter contract in
pyproject.toml forbids a direct one)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Set

# the packages whose __init__ imports the zoo; their submodules longctx uses import none of it
_PACKAGES_NOT_RUN = ("streaming", "streaming.base")
# registration, the first imports and a package's completion, one thread at a time (re-entrant: completing
# streaming completes streaming.base inside)
_lock = threading.RLock()
_ready = False


def streaming_module(name: str) -> ModuleType:
    """The module `streaming.<name>` of mosaicml-streaming (e.g. "base.dataset"), its package's zoo not imported."""
    global _ready
    if not _ready:
        with _lock:
            if not _ready:
                for package in _PACKAGES_NOT_RUN:
                    if package not in sys.modules:
                        _register_not_run(package)
                # streaming's modules import each other in cycles that resolve only in the order its __init__
                # meets them (streaming.base.util first fails); the dataset module's imports follow that order
                importlib.import_module("streaming.base.dataset")
                _ready = True
    return importlib.import_module(f"streaming.{name}")


def _names_defined(path: str) -> Set[str]:
    """The names a package's __init__ binds at its top level (imports, assignments, definitions)."""
    names = set()
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _register_not_run(package: str) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"mosaicml-streaming is not installed (no module {package!r}): "
                                  "pip install mosaicml-streaming, or install longctx with its dependencies")
    module = importlib.util.module_from_spec(spec)
    its_names = _names_defined(spec.origin)
    running = False         # inside the __init__ (under the lock: this thread), a name it asks for runs it not again

    def complete(attr: str):
        """A submodule's name imports the submodule (as `from package import submodule` would); the first of the
        names the package's __init__ defines runs it (again after a failure, which is raised each time)."""
        nonlocal running
        if importlib.util.find_spec(f"{package}.{attr}") is not None:
            return importlib.import_module(f"{package}.{attr}")
        if attr not in its_names:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        with _lock:
            # this hook is removed once the __init__ has run: still here, it has not (or it failed)
            if "__getattr__" in module.__dict__ and not running:
                running = True
                try:
                    spec.loader.exec_module(module)
                    module.__dict__.pop("__getattr__", None)
                finally:
                    running = False
        if attr in module.__dict__:
            return module.__dict__[attr]
        raise AttributeError(f"module {package!r} has no attribute {attr!r} (yet: its __init__ is running)")

    module.__getattr__ = complete
    sys.modules[package] = module
    parent, _, child = package.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
