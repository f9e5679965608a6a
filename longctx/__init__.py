"""longctx: continual pretraining that makes Mamba-2 work on 100K-1M token contexts.

The installed namespace. Its subpackages are the repository's top-level folders:
`longctx.kernels` (SSD scans), `longctx.data` (raw text -> MDS shards -> packed batches),
`longctx.pipeline` (model, sequence parallelism, training, evaluation, benchmarks) and
`longctx.launch` (the `longctx` command and the cluster scripts). See docs/ARCHITECTURE.md.
"""
import os

__version__ = "0.1.0"

# Run from a source checkout without installing (PYTHONPATH=<checkout>, as on a GPU node with no
# package index): the subpackages are this folder's siblings. An installed copy has no pyproject.toml
# beside it, so this never widens the installed package.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and \
        os.path.isfile(os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)
