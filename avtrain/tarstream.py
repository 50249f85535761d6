"""Samples out of a WebDataset tar stream, with the least Python work per member.

The loader's profile had tar reading and grouping at a third of its time: the standard
library's `tarfile` parses every 512-byte header field by field in Python and webdataset wraps
each member in a dict before grouping. This reader does what those two do for the shards
(POSIX ustar, pax and GNU long-name headers; regular files only; the header checksum checked)
in one pass: one `read` of a header, one of the data, the padding read (not seeked, so a
caching tee sees every byte), and members grouped into samples exactly as webdataset's
`group_by_keys` groups them (key = the path up to the first dot of the file name, suffix
lower-cased, `__key__` and `__url__` added). The tars stay plain WebDataset tars: this reads
them, `webdataset` still reads them without avbalance.

Anything that is not a plain tar (a gzip-compressed one included: avprep never writes those)
raises ValueError, which the loader's handler reports as it reports webdataset's errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _number(field: bytes) -> int:
    """An octal header number (NUL/space padded), or GNU base-256 for large values."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else value
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # sockets and fsspec streams may return less than asked
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<value>\\n" records)."""
    i, path = 0, None
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        i += length
    return path


def _header(stream) -> tuple[bytes, int] | None:
    """The next header block and its member's size; None at the end of the archive."""
    header = _read(stream, BLOCK)
    if header[:2] == b"\x1f\x8b":
        raise ValueError("a gzip-compressed tar: avprep writes plain tars; decompress it")
    if len(header) < BLOCK or header.count(0) == BLOCK:  # end of archive (or of data)
        if header and header.count(0) != len(header):
            raise ValueError("truncated tar header")
        return None
    try:
        checksum = _number(header[148:156])
    except ValueError:  # not even an octal number there
        checksum = -1
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        raise ValueError("bad tar header checksum: not a tar file, or a corrupt one")
    return header, _number(header[124:136])


def _short_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:263] in (b"ustar\x00", b"ustar "):
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name


def _long_name(kind: bytes, data: bytes) -> str | None:
    return (_pax_path(data) if kind == b"x"
            else data.rstrip(b"\0").decode("utf-8", "surrogateescape"))


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file of an uncompressed tar stream, in order."""
    long_name: str | None = None
    while True:
        found = _header(stream)
        if found is None:
            return
        header, size = found
        kind = header[156:157]
        data = _read(stream, size)
        if len(data) < size or len(_read(stream, -size % BLOCK)) < -size % BLOCK:
            raise ValueError("unexpected end of data inside a tar member")
        if kind in (b"x", b"L"):  # the next member's name: pax `path` or GNU long name
            long_name = _long_name(kind, data)
            continue
        if kind not in _FILE_TYPES:  # directories, links, global pax headers, ...
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _short_name(header)
        yield name, data


def _sample_key(name: str) -> tuple[str, str] | None:
    """(key, lower-cased suffix) of a member as webdataset groups it; None: not a sample's."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    match = _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def tar_spans(stream) -> list[tuple[str, int, int, str]]:
    """(key, byte offset, byte length, member suffixes joined by spaces) of every sample of a
    tar, grouped exactly as `tar_samples` groups them (a member whose key differs from the
    previous member's starts a new sample, even if that key was seen before). Only headers are
    parsed: a seekable stream skips the data, any other is read through (a remote tar that
    must be read once anyway, e.g. into the cache)."""
    seekable = getattr(stream, "seekable", lambda: False)()
    spans: list[list] = []
    pos, start, long_name = 0, None, None
    while True:
        header_at = pos
        found = _header(stream)
        if found is None:
            break
        header, size = found
        kind = header[156:157]
        padded = size + -size % BLOCK
        pos += BLOCK + padded
        if start is None:
            start = header_at  # a long-name header belongs to the member after it
        if kind in (b"x", b"L"):
            data = _read(stream, size)
            if len(data) < size or len(_read(stream, padded - size)) < padded - size:
                raise ValueError("unexpected end of data inside a tar member")
            long_name = _long_name(kind, data)
            continue
        if seekable:
            stream.seek(padded, 1)
        elif len(_read(stream, padded)) < padded:
            raise ValueError("unexpected end of data inside a tar member")
        name, long_name = (long_name, None) if long_name is not None else (
            _short_name(header), None)
        member_start, start = start, None
        if kind not in _FILE_TYPES:
            continue
        found_key = _sample_key(name)
        if found_key is None:
            continue
        key, suffix = found_key
        if spans and spans[-1][0] == key:
            spans[-1][2] = pos - spans[-1][1]
            spans[-1][3].append(suffix)
        else:
            spans.append([key, member_start, pos - member_start, [suffix]])
    if seekable and pos > stream.seek(0, 2):
        raise ValueError("unexpected end of data inside a tar member")
    return [(k, off, n, " ".join(sfx)) for k, off, n, sfx in spans]


def sample_at(data: bytes, url: str, key: str) -> dict:
    """The one sample whose members are `data` (a byte range from `tar_spans`), as
    `tar_samples` yields it; ValueError when the bytes are not that sample (the tar changed
    since its offsets were recorded)."""
    import io

    samples = list(tar_samples(io.BytesIO(data), url))
    if len(samples) != 1 or samples[0]["__key__"] != key:
        raise ValueError(f"the bytes recorded for sample {key} in {url} hold another sample "
                         "(the tar changed after its offsets were recorded)")
    return samples[0]


def tar_samples(stream, url: str) -> Iterator[dict]:
    """The samples of one tar, as webdataset's tarfile_to_samples yields them."""
    sample: dict | None = None
    for name, data in tar_members(stream):
        found = _sample_key(name)
        if found is None:
            continue
        key, suffix = found
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {url}")
        sample[suffix] = data
    if sample is not None:
        yield sample
