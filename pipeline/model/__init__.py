"""The Mamba-2 language model and what belongs to it alone: its hyperparameters (`config`), the
network (`mamba2`), its sequence-wide operations (`ops`), recurrent decoding (`inference`), the
per-layer mitigation values it applies (`mitigations`), the mamba_ssm / Hugging Face directory
formats it loads and saves (`formats`), and loading a model from any directory (`load`)."""
from .config import Mamba2Config
from .mamba2 import Mamba2LM
from .mitigations import LayerMitigations

__all__ = ["LayerMitigations", "Mamba2Config", "Mamba2LM"]
