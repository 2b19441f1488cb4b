"""MA-AGIQA: quality scores for AI-generated images from a multimodal LLM's semantic vectors, a MANIQA
quality branch and a mixture of experts."""
from .config import ModelConfig
from .images import ImageError, QualityViews, decode_image, quality_views
from .model import MAAGIQA, create_model, from_pretrained
from .registry import get_config, list_models, register_model

__all__ = [
    "MAAGIQA",
    "ImageError",
    "ModelConfig",
    "QualityViews",
    "create_model",
    "decode_image",
    "from_pretrained",
    "get_config",
    "list_models",
    "quality_views",
    "register_model",
]
