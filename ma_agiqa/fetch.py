"""Reading whole objects (images) from any store fsspec knows, with the size limit checked first and every
remote read bounded in time."""
from __future__ import annotations

import os

import fsspec
from fsspec.asyn import AsyncFileSystem, sync

from .errors import ImageError
from .uris import LOCAL_SCHEMES, redact, redact_text, scheme_of

DEFAULT_MAX_BYTES = 64 << 20  # an object larger than this is refused before it is read
# Seconds. A store that accepts the connection and never answers costs a row at most FETCH_TIMEOUT (the
# deadline of the whole object: its size, its bytes and every retry of the store's client), and any one request
# READ_TIMEOUT without a byte.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 20.0
FETCH_TIMEOUT = 60.0


def _store_options(scheme: str, connect: float, read: float) -> dict:
    """The filesystem's own connect and read timeouts, for the stores whose client takes them."""
    if scheme == "s3":
        return {"config_kwargs": {"connect_timeout": connect, "read_timeout": read}}
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)}}
    return {}


class Fetcher:
    """Reads whole objects, one filesystem instance per scheme (fsspec caches them too). An object over
    ``max_bytes`` is refused from its size, before a byte of it is read. A remote object that takes longer
    than ``fetch_timeout`` seconds, all told, is a ``timeout`` error (transient: the next run retries it)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, fetch_timeout: float = FETCH_TIMEOUT):
        self.max_bytes = max_bytes
        self.connect_timeout, self.read_timeout, self.fetch_timeout = connect_timeout, read_timeout, fetch_timeout
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def _filesystem(self, uri: str):
        scheme = scheme_of(uri) or "file"
        if scheme not in self._fs:
            if scheme in LOCAL_SCHEMES:
                self._fs[scheme] = fsspec.filesystem("file")
            else:
                self._fs[scheme] = fsspec.filesystem(scheme, **_store_options(scheme, self.connect_timeout, self.read_timeout))
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

    def _read(self, fs, uri: str) -> bytes:
        self._refuse_over_limit(uri, fs.size(uri))
        with fs.open(uri, "rb") as f:
            return f.read(self.max_bytes + 1)

    async def _read_async(self, fs: AsyncFileSystem, uri: str) -> bytes:
        size = (await fs._info(uri)).get("size")
        self._refuse_over_limit(uri, size)
        if size is not None:
            return await fs._cat_file(uri)
        return await fs._cat_file(uri, start=0, end=self.max_bytes + 1)  # a store that does not say the size

    def fetch(self, uri: str) -> bytes:
        fs = self._filesystem(uri)
        shown = redact(uri)
        try:
            if isinstance(fs, AsyncFileSystem) and self.fetch_timeout:
                # the whole object under one deadline: the coroutine is cancelled when it passes
                data = sync(fs.loop, self._read_async, fs, uri, timeout=self.fetch_timeout)
            else:
                data = self._read(fs, uri)
            if len(data) > self.max_bytes:  # a store that did not know the size in advance
                raise ImageError("too_large", f"{shown} is over the limit of {self.max_bytes} bytes (--max-bytes)")
            return data
        except ImageError:
            raise
        except FileNotFoundError as e:
            cause = e.__cause__  # fsspec's http store says "not found" for any failure of its size request
            if cause is not None and getattr(cause, "status", None) not in (404, 410):
                raise self._failure(cause, shown) from None
            raise ImageError("missing", f"no such object: {shown}") from None
        except IsADirectoryError:
            raise ImageError("missing", f"is a directory: {shown}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {shown} ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - network and store errors of every library
            raise self._failure(e, shown) from None

    def _failure(self, e: BaseException, shown: str) -> ImageError:
        """A store's or network's error as the row's error: ``timeout`` when time ran out, else ``fetch``."""
        name = type(e).__name__
        if name == "FSTimeoutError":
            return ImageError("timeout", f"no answer within {self.fetch_timeout:g} s reading {shown} (--fetch-timeout)")
        timed_out = isinstance(e, TimeoutError) or "timeout" in name.lower() or "timed out" in str(e).lower()
        return ImageError("timeout" if timed_out else "fetch", f"{name} reading {shown}: {redact_text(str(e))[:200]}")
