"""The loader's tar reader and .npy reader against webdataset's and numpy's, on real shards and on
tars written in every header format the standard library writes."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from avtrain.data import open_shards
from avtrain.decode import load_npy
from avtrain.tarstream import tar_members, tar_samples


def _wds_samples(url: str) -> list[dict]:
    with open(url, "rb") as f:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}])
        return list(wds.tariterators.group_by_keys(files))


def test_shards_read_as_webdataset_reads_them(train_shards):
    shards = open_shards(str(train_shards))
    urls = [u for split in ("train", "val", "test") for u in shards.urls(split)]
    assert len(urls) > 3
    for url in urls:
        with open(url, "rb") as f:
            ours = list(tar_samples(f, url))
        theirs = _wds_samples(url)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), a["__key__"]


def _tar(members: list[tuple[str, bytes]], fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)  # not a file: skipped by both readers
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LONG = "d" * 90 + "/" + "k" * 120  # > 100 characters: a pax or GNU long-name header
MEMBERS = [("a.cls", b"1"), ("a.f000.jpg", b"\xff\xd8" * 300), ("a.JSON", b"{}"),
           (LONG + ".cls", b"2"), (LONG + ".spec.npy", bytes(range(256)) * 5),
           ("sub/é.txt", "ünïcode".encode()), ("__meta__", b"skip"), ("empty.cls", b"")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_every_header_format_reads_as_tarfile_and_webdataset_read_it(tmp_path, fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [
        (n, d) for n, d in MEMBERS if len(n) <= 100 and n.isascii()]
    data = _tar(members, fmt)
    got = list(tar_members(io.BytesIO(data)))
    assert got == members  # every regular file, in order, with its full name
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    ours = list(tar_samples(io.BytesIO(data), str(path)))
    theirs = _wds_samples(str(path))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    assert ours == theirs
    assert ours[0]["json"] == b"{}"  # suffixes lower-cased, as webdataset does


def test_a_corrupt_or_compressed_tar_is_an_error():
    data = _tar(MEMBERS[:2], tarfile.PAX_FORMAT)  # dir, a.cls, a.f000.jpg (600 bytes)
    bad = bytearray(_tar(MEMBERS[:2], tarfile.PAX_FORMAT))
    bad[100] ^= 0x01  # the first header's mode field: its checksum no longer matches
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(bad))))
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(b"not a tar at all" * 64)))
    with pytest.raises(ValueError, match="end of data"):
        list(tar_members(io.BytesIO(data[:4 * 512 + 100])))  # cut inside the JPEG's data
    with pytest.raises(ValueError, match="end of data"):
        list(tar_members(io.BytesIO(data[:3 * 512 - 10])))  # cut inside a.cls's padding
    import gzip

    with pytest.raises(ValueError, match="gzip"):
        list(tar_members(io.BytesIO(gzip.compress(data))))
    dup = _tar([("a.cls", b"1"), ("a.cls", b"2")], tarfile.PAX_FORMAT)
    with pytest.raises(ValueError, match="duplicate"):
        list(tar_samples(io.BytesIO(dup), "dup.tar"))


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array(7, dtype=np.int16),
    np.zeros((0, 5), dtype=np.float16),
    np.arange(6, dtype=">i4").reshape(2, 3),
])
def test_npy_members_read_as_numpy_reads_them(array):
    buf = io.BytesIO()
    np.save(buf, array)
    got = load_npy(buf.getvalue())
    want = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_npy_with_objects_or_garbage_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects"):
        load_npy(buf.getvalue())
    with pytest.raises(ValueError, match="not an .npy"):
        load_npy(b"PK\x03\x04 not numpy")
