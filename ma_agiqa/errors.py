"""Errors shared by the light modules (storage, curation) and the image preprocessing, without importing
torch: a filter or manifest check should not pay for it."""

# 50 megapixels: 7071x7071. Generated images are rarely over 4096x4096 (16.8 MP).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """A per-image failure that becomes the row's error: ``kind`` is one of missing, fetch, empty, not_image,
    truncated, too_large, bad_mode, unsupported_scheme, escapes_root, missing_uri."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
