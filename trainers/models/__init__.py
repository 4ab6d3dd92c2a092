"""Networks: DiT and its registry."""
from trainers.models.dit import SIZES, DiT, DiTBlock, DiTSpec
from trainers.models.registry import build_model, model_spec

__all__ = ["DiT", "DiTBlock", "DiTSpec", "SIZES", "build_model", "model_spec"]
