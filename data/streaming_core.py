"""mosaicml-streaming's modules, imported without the package's dataset zoo.

`import streaming` (and any `from streaming.base... import`) first runs streaming/__init__.py and
streaming/base/__init__.py, which import streaming's example datasets (`streaming.text`, `.vision`,
`.multimodal`) and its DataLoader, and with them transformers and torchvision: ~3-4 s of CPU in every process
that reads or writes shards (each rank of a run, each Ray worker of a prepare, each evaluation), for nothing
longctx uses. Here those two packages are registered with their `__init__` not yet run, so Python imports
only the submodules asked for (the dataset, the MDS writer, shared memory: ~0.1 s). The first use of a name
their `__init__` defines (`streaming.StreamingDataset`, by code of a user's in the same process) runs it then:
the full package, as if imported normally. A process that imported streaming before keeps it as it is.

Every import of streaming in longctx goes through `streaming_module` (an import-linter contract in
pyproject.toml forbids a direct one)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

# the packages whose __init__ imports the zoo; their submodules longctx uses import none of it
_PACKAGES_NOT_RUN = ("streaming", "streaming.base")
_completing = threading.RLock()     # completing streaming completes streaming.base inside


def streaming_module(name: str) -> ModuleType:
    """The module `streaming.<name>` of mosaicml-streaming (e.g. "base.dataset"), its package's zoo not imported."""
    if not all(package in sys.modules for package in _PACKAGES_NOT_RUN):
        for package in _PACKAGES_NOT_RUN:
            if package not in sys.modules:
                _register_not_run(package)
        # streaming's modules import each other in cycles that resolve only in the order its __init__ meets them
        # (streaming.base.util first fails); the dataset module's imports follow that order
        importlib.import_module("streaming.base.dataset")
    return importlib.import_module(f"streaming.{name}")


def _register_not_run(package: str) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"mosaicml-streaming is not installed (no module {package!r}): "
                                  "pip install mosaicml-streaming, or install longctx with its dependencies")
    module = importlib.util.module_from_spec(spec)

    def complete(attr: str):
        """A submodule's name imports the submodule (as `from package import submodule` would); the first other
        name runs the package's __init__ (dunders, which tools probe, do not)."""
        if attr.startswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{package}.{attr}") is not None:
            return importlib.import_module(f"{package}.{attr}")
        with _completing:
            if module.__dict__.pop("__getattr__", None) is not None:
                spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = complete
    sys.modules[package] = module
    parent, _, child = package.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
