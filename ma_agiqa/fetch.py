"""Reading whole objects (images) from any store fsspec knows, with the size limit checked first."""
from __future__ import annotations

import os

import fsspec

from .errors import ImageError
from .uris import LOCAL_SCHEMES, redact, redact_text, scheme_of

DEFAULT_MAX_BYTES = 64 << 20  # an object larger than this is refused before it is read


class Fetcher:
    """Reads whole objects, one filesystem instance per scheme (fsspec caches them too). An object over
    ``max_bytes`` is refused from its size, before a byte of it is read."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def _filesystem(self, uri: str):
        scheme = scheme_of(uri) or "file"
        if scheme not in self._fs:
            self._fs[scheme] = fsspec.filesystem("file" if scheme in LOCAL_SCHEMES else scheme)
        return self._fs[scheme]

    def check_local(self, path: str) -> None:
        """A local file's existence and size, from one stat: the errors ``fetch`` would raise, sooner."""
        try:
            size = os.stat(path.split("://", 1)[1] if "://" in path else path).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError("missing", f"no such object: {redact(path)}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {redact(path)} ({type(e).__name__})") from None
        self._refuse_over_limit(path, size)

    def _refuse_over_limit(self, uri: str, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise ImageError("too_large", f"{redact(uri)} is {size} bytes, over the limit of {self.max_bytes} (--max-bytes)")

    def fetch(self, uri: str) -> bytes:
        fs = self._filesystem(uri)
        shown = redact(uri)
        try:
            self._refuse_over_limit(uri, fs.size(uri))
            with fs.open(uri, "rb") as f:
                data = f.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:  # a store that did not know the size in advance
                raise ImageError("too_large", f"{shown} is over the limit of {self.max_bytes} bytes (--max-bytes)")
            return data
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("missing", f"no such object: {shown}") from None
        except IsADirectoryError:
            raise ImageError("missing", f"is a directory: {shown}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {shown} ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - network and store errors of every library
            kind = "timeout" if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower() else "fetch"
            raise ImageError(kind, f"{type(e).__name__} reading {shown}: {redact_text(str(e))[:200]}") from None
