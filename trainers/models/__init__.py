"""Networks by family (DiT; MEME adds U-Nets) and the contract transforms rely on."""
from trainers.models.contract import BlockAdapter, TokenBackbone, require_token_backbone
from trainers.models.dit import SIZES, DiT, DiTBlock, DiTSpec
from trainers.models.registry import FAMILIES, build_model, model_spec, spec_from_dict, spec_to_dict

__all__ = ["DiT", "DiTBlock", "DiTSpec", "SIZES", "FAMILIES", "build_model", "model_spec", "spec_to_dict",
           "spec_from_dict", "BlockAdapter", "TokenBackbone", "require_token_backbone"]
