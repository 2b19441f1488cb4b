"""URIs: which scheme a URI has, whether it is remote, how it is shown in logs, and where a manifest's
relative ``uri`` resolves under an ``--image-root`` (the confinement rule)."""
from __future__ import annotations

import functools
import os
import posixpath
import re
import urllib.parse

from .errors import ImageError

REMOTE_SCHEMES = {"s3", "s3a", "gs", "gcs", "http", "https"}
LOCAL_SCHEMES = {"", "file", "local"}
def scheme_of(uri: str) -> str:
    """The lower-cased scheme of a URI; '' for a plain path."""
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def redact(uri) -> str:
    """A URI fit for logs and error messages: a URL of a store or server (s3://, https://) without its query
    string and fragment, where pre-signed URLs carry their credentials, and without a user:password@ part.
    A local path or file:// URI is shown whole: ``?`` and ``#`` are characters of its file names."""
    text = str(uri)
    if not is_remote(text):
        return text
    for sep in ("?", "#"):
        text = text.split(sep, 1)[0]
    if "://" in text:
        scheme, rest = text.split("://", 1)
        host, slash, path = rest.partition("/")
        text = f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path}"
    return text


def resolve_image_uri(uri, image_root: str | None, allow_outside_root: bool = False) -> str:
    """The absolute URI of a manifest's ``uri`` value, or an ImageError that says why it has none.

    With an ``image_root`` every URI must lie inside it (``escapes_root`` otherwise), remote ones included,
    and a local path is judged after its symlinks are followed, so a link inside the root that points out of
    it is refused too; ``allow_outside_root`` lifts the confinement of absolute URIs."""
    if uri is None or (isinstance(uri, float)) or not str(uri).strip():
        raise ImageError("missing_uri", "the row has no uri")
    uri = str(uri).strip()
    scheme = scheme_of(uri)
    if scheme and scheme not in REMOTE_SCHEMES | LOCAL_SCHEMES:
        raise ImageError("unsupported_scheme", f"unsupported URI scheme {scheme!r} in {redact(uri)!r}")
    if image_root is None:
        if scheme in REMOTE_SCHEMES:
            return uri
        return os.path.abspath(local_path(uri))
    root_scheme = scheme_of(image_root)
    root_remote = root_scheme in REMOTE_SCHEMES
    absolute = bool(scheme) or uri.startswith("/")
    if absolute and allow_outside_root:
        return uri if scheme in REMOTE_SCHEMES else os.path.abspath(local_path(uri))
    if scheme in REMOTE_SCHEMES:
        if not root_remote or scheme != root_scheme or not _under(_key(uri), _key(image_root)):
            raise ImageError("escapes_root", f"{redact(uri)!r} lies outside the image root")
        return uri
    path = local_path(uri)
    if root_remote:
        if absolute:
            raise ImageError("escapes_root", f"{redact(uri)!r} lies outside the image root")
        full = posixpath.normpath(posixpath.join(_key(image_root), path))
        if not _under(full, _key(image_root)):
            raise ImageError("escapes_root", f"{redact(uri)!r} resolves outside the image root")
        return f"{root_scheme}://{full}"
    root_path = _real_dir(local_path(image_root))
    full = os.path.normpath(os.path.join(root_path, path))
    if _under(full, root_path):  # then follow symlinks: the directory's (cached), then the file's own
        parent, name = os.path.split(full)
        full = os.path.join(_real_dir(parent), name)
        if os.path.islink(full):
            full = os.path.realpath(full)
    if not _under(full, root_path):
        raise ImageError("escapes_root", f"{redact(uri)!r} resolves outside the image root")
    return full


def local_path(uri: str) -> str:
    """The path of a local URI: a plain path as written (``a%20b.jpg`` is a file of that name), a file://
    URI percent-decoded as ``Path.as_uri()`` encodes it (``file:///data/a%20b.jpg`` -> ``/data/a b.jpg``)."""
    scheme = scheme_of(uri)
    if not scheme:
        return uri
    path = uri.split("://", 1)[1]
    return urllib.parse.unquote(path) if scheme == "file" else path


@functools.lru_cache(maxsize=65536)
def _real_dir(path: str) -> str:
    """A directory's real path. Cached: a manifest's rows share few directories, and realpath costs a
    system call per path component."""
    return os.path.realpath(path)


def _key(uri: str) -> str:
    """bucket/key of a remote URI, with any '..' collapsed."""
    return posixpath.normpath(uri.split("://", 1)[1])


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_QUERY = re.compile(r"(\b(?!(?:file|local)://)\w+://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact_text(text: str) -> str:
    """Every URL inside a message without its query string (a store's error may quote the URL it was given);
    file:// URIs are left whole, as ``redact`` leaves them."""
    return _QUERY.sub(r"\1", text)


def join_uri(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def is_remote(uri) -> bool:
    """Whether a URI names anything but this machine's files (an object store, a web server, any fsspec
    filesystem with a scheme)."""
    return scheme_of(str(uri)) not in LOCAL_SCHEMES
