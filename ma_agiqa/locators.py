"""Where an image lives when it is not an object of its own: a member of a WebDataset tar shard, or a cell of
a Parquet file's image column. A score table's ``uri`` holds one of these for such images, so that a kept set
can be exported from the same containers it was scored from.

The forms are chained URLs, as fsspec writes them (``tar://member::s3://bucket/shard.tar``); the Parquet one
follows the same shape (``parquet://column/row::s3://bucket/part.parquet``). A plain URI is an object.
"""
from __future__ import annotations

from dataclasses import dataclass

TAR, PARQUET = "tar", "parquet"


@dataclass(frozen=True)
class Locator:
    kind: str  # "object", "tar" or "parquet"
    container: str  # the object's URI, the shard's or the Parquet file's
    member: str | None = None  # the tar member's name
    column: str | None = None  # the Parquet image column
    row: int | None = None  # the row's position in the Parquet file


def tar_member(shard_uri: str, member: str) -> str:
    return f"{TAR}://{member}::{shard_uri}"


def parquet_cell(file_uri: str, column: str, row: int) -> str:
    return f"{PARQUET}://{column}/{int(row)}::{file_uri}"


def parse(uri: str) -> Locator:
    """The locator a ``uri`` value names; a ValueError for a malformed container form."""
    for kind in (TAR, PARQUET):
        prefix = f"{kind}://"
        if uri.startswith(prefix) and "::" in uri:
            inner, container = uri[len(prefix):].split("::", 1)
            if not inner or not container:
                break
            if kind == TAR:
                return Locator(TAR, container, member=inner)
            column, _, row = inner.rpartition("/")
            if not column or not row.isdigit():
                break
            return Locator(PARQUET, container, column=column, row=int(row))
    else:
        return Locator("object", uri)
    raise ValueError(f"malformed container locator: {uri!r}")


def is_container(uri) -> bool:
    text = str(uri)
    return "::" in text and text.startswith((f"{TAR}://", f"{PARQUET}://"))
