"""Reading images where they come in containers or with their prompt beside or inside them: listing a folder
(or glob) of images once, brace patterns of shard names, the samples of a WebDataset tar shard, and the prompt
a generator wrote into a PNG's text chunks. Plain I/O, no Ray: ``scoring.inputs`` builds the job's input
kinds on these."""
from __future__ import annotations

import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from .uris import LOCAL_SCHEMES, redact, redact_text

IMAGE_SUFFIXES = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif", "heic", "jxl"})
GLOB_CHARS = "*?["


def suffix(name: str) -> str:
    """The lower-cased extension of a file name, without the dot."""
    return posixpath.splitext(name)[1].lower().lstrip(".")


def full_uri(protocol: str, path: str) -> str:
    """A path fsspec listed, as a URI of the listed filesystem (plain paths stay plain)."""
    return path if not protocol or protocol in LOCAL_SCHEMES else f"{protocol}://{path}"


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00002}.tar`` -> the three names (zero padding kept); ``{a,b}`` lists too; nested and
    several groups expand in order. A pattern without braces is itself."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + o + t for o in options for t in expand_braces(tail)]


def has_braces(uri: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", uri))


# -- prompts inside a PNG ------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_LIMIT = 8 << 20  # bytes of header chunks read at most before giving up on finding text


def png_text(f) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG read from file object ``f``, up to its first image data
    chunk: the header only, no pixel is read or decoded. {} for a file that is not a PNG."""
    if f.read(8) != PNG_SIGNATURE:
        return {}
    out, read = {}, 8
    while read < PNG_TEXT_LIMIT:
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            data = f.read(length)
            f.read(4)  # crc
            try:
                key, value = _text_chunk(kind, data)
                out.setdefault(key, value)
            except (ValueError, zlib.error):
                pass
        else:
            f.seek(length + 4, 1)
        read += 12 + length
    return out


def _text_chunk(kind: bytes, data: bytes) -> tuple[str, str]:
    key, _, rest = data.partition(b"\0")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
    compressed, rest = rest[0], rest[2:]  # iTXt: flag, method, language\0, translated keyword\0, text
    _, _, rest = rest.partition(b"\0")
    _, _, text = rest.partition(b"\0")
    return key.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")


def metadata_prompt(chunks: dict[str, str]) -> str | None:
    """The positive prompt a generator wrote into a PNG's text chunks, or None:
    - ``parameters`` (Automatic1111, Forge, SD.Next): the text before ``\\nNegative prompt:`` (else before
      the settings line ``\\nSteps: ...``);
    - ``prompt`` (ComfyUI): the API graph as JSON; the text of the node that a sampler's ``positive`` input
      leads to (through links, e.g. a CLIPTextEncode's ``text``), else the first CLIPTextEncode's text; a
      ``prompt`` chunk that is not JSON is the prompt itself;
    - ``Description`` (NovelAI): the prompt as is."""
    text = chunks.get("parameters")
    if text:
        for marker in ("\nNegative prompt:", "\nSteps: "):
            if marker in text:
                return text.split(marker, 1)[0].strip() or None
        return text.strip() or None
    text = chunks.get("prompt")
    if text:
        try:
            graph = json.loads(text)
        except ValueError:
            return text.strip() or None
        return comfy_prompt(graph) if isinstance(graph, dict) else None
    text = chunks.get("Description")
    return text.strip() if text and text.strip() else None


def comfy_prompt(graph: dict) -> str | None:
    """The positive prompt of a ComfyUI API graph (``{node id: {class_type, inputs}}``): pragmatic, not a
    graph evaluator. Follows a sampler's ``positive`` link to the text that feeds it (at most 8 links)."""

    def text_of(ref, depth=0):
        if isinstance(ref, str):
            return ref.strip() or None
        if depth < 8 and isinstance(ref, list) and ref and str(ref[0]) in graph:
            inputs = (graph[str(ref[0])] or {}).get("inputs") or {}
            for name in ("text", "text_g", "text_l", "string", "value", "prompt", "conditioning", "positive", "conditioning_1"):
                if name in inputs and (found := text_of(inputs[name], depth + 1)):
                    return found
        return None

    nodes = [n for n in graph.values() if isinstance(n, dict)]
    for node in nodes:
        if "positive" in (node.get("inputs") or {}) and (found := text_of(node["inputs"]["positive"])):
            return found
    for node in nodes:
        if str(node.get("class_type", "")).startswith("CLIPTextEncode"):
            if found := text_of((node.get("inputs") or {}).get("text")):
                return found
    return None


# -- WebDataset shards ---------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One sample of a WebDataset shard: the members sharing its key, as far as the job uses them."""

    key: str
    image_member: str | None = None
    image_plain: bool = False  # the image member's extension is an image suffix alone (jpg), not seg.jpg
    image: bytes | None = None  # only when read with keep_images
    txt: str | None = None
    json: dict = field(default_factory=dict)
    error: str | None = None  # "kind: message": the sample cannot be scored


def sample_key(member: str) -> tuple[str, str]:
    """WebDataset's rule: a member ``dir/abc.seg.jpg`` is key ``dir/abc``, extension ``seg.jpg``."""
    directory, name = posixpath.split(member)
    stem, _, ext = name.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def tar_samples(shard: str, keep_images: bool, max_bytes: int) -> Iterator[Sample]:
    """The samples of a tar shard in the order of its members (consecutive members of one key are one
    sample). The image is the sample's first member with a plain image extension (``jpg``, ``png``), else its
    first with a compound one (``seg.png``: the last part decides); ``txt`` its ``.txt`` member, ``json`` its ``.json`` member. The shard is streamed once (one
    GET on an object store); member bytes are read even when not kept, so the driver's pass and a read task
    see the same members and the same failures. A shard that cannot be opened or breaks off yields one last
    Sample with key None and the error: the samples before the break are kept."""
    current: Sample | None = None
    try:
        with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = sample_key(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield _finish(current, shard)
                    current = Sample(key)
                last = ext.rsplit(".", 1)[-1]
                # a plain image extension (jpg) wins over a compound one (mask.png, seg.jpg: a mask, a depth map)
                # whatever their order in the tar
                if last in IMAGE_SUFFIXES and (current.image_member is None or (ext == last and not current.image_plain)):
                    current.image_member, current.image_plain, current.image = info.name, ext == last, None
                    current.error = None if current.error and current.error.startswith("too_large") else current.error
                    if info.size > max_bytes:
                        current.error = (f"too_large: {info.name} in {redact(shard)} is {info.size} bytes, over the limit "
                                         f"of {max_bytes} (--max-bytes)")
                        continue  # never read: the stream skips it
                    data = tar.extractfile(info).read()
                    if keep_images:
                        current.image = data
                elif ext in ("txt", "json") and info.size <= 1 << 20:
                    data = tar.extractfile(info).read()
                    if ext == "txt":
                        current.txt = data.decode("utf-8", "replace").strip()
                    else:
                        try:
                            doc = json.loads(data)
                            current.json = doc if isinstance(doc, dict) else {}
                        except ValueError:
                            current.error = current.error or f"decode: malformed JSON member {info.name} in {redact(shard)}"
        if current is not None:
            yield _finish(current, shard)
    except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt shard: an error row, not a crash
        yield Sample(None, error=shard_error(e, shard))  # the sample being read when it broke off is part of it


def _finish(sample: Sample, shard: str) -> Sample:
    if sample.image_member is None and sample.error is None:
        sample.error = f"missing: sample {sample.key} of {redact(shard)} has no image member"
    return sample


def shard_error(e: Exception, shard: str) -> str:
    if isinstance(e, FileNotFoundError):
        return f"missing: no such shard {redact(shard)}"
    if isinstance(e, (tarfile.TarError, EOFError, zlib.error)):
        return f"truncated: shard {redact(shard)} breaks off: {type(e).__name__}: {redact_text(str(e))[:200]}"
    return f"fetch: {type(e).__name__} reading shard {redact(shard)}: {redact_text(str(e))[:200]}"
