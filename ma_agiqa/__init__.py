"""MA-AGIQA: quality scores for AI-generated images from a multimodal LLM's semantic vectors, a MANIQA
quality branch and a mixture of experts.

Names are imported on first use, so that a pipeline worker that only decodes images or reads manifests
does not pay for importing timm and transformers.
"""
import importlib

_EXPORTS = {
    "MAAGIQA": "model",
    "create_model": "model",
    "from_pretrained": "model",
    "ModelConfig": "config",
    "ImageError": "images",
    "QualityViews": "config",
    "decode_image": "images",
    "quality_views": "preprocess",
    "get_config": "registry",
    "list_models": "registry",
    "register_model": "registry",
    "read_scores": "score_table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
