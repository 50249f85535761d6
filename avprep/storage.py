"""Where a shard set lives: a local folder or an object-storage prefix, read and written alike.

    store = Store.at("s3://bucket/prefix")     # or gs://..., https://host/path, or a folder
    store.read_json("index.json"); store.open_read("train-000000.tar")  # a stream, not a copy
    store.put_file("/tmp/x.tar", "train-000000.tar"); store.write_json("index.json", index)

URL rules (DESIGN §5 Storage, §6 Security):
- accepted: a local path, `s3://BUCKET[/PREFIX]`, `gs://BUCKET[/PREFIX]` (`gcs://` is the same),
  `http(s)://HOST[/PATH]` (read-only); any other scheme, `pipe:` included, is one error line;
- a member name (from index.json or a stats file) is a relative path of `[A-Za-z0-9._-]`
  segments, each starting with a letter or digit: no `..`, no absolute path, no scheme, no
  other bucket or host, no query or fragment, so it resolves only under the given prefix;
- credentials and endpoints come from each store's own environment and config files (botocore:
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE,
  ~/.aws; gcsfs: GOOGLE_APPLICATION_CREDENTIALS, gcloud's files, the metadata server, and
  STORAGE_EMULATOR_HOST for an emulator).

Remote failures (missing object, unreachable endpoint, access denied) are `UserError`s: one
line, no traceback. `ShardOpener` opens one tar for the loader, optionally through a bounded
local cache that is filled while the tar streams by (never a download before reading).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

from .errors import UserError

REMOTE_SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "https"}
READ_ONLY_SCHEMES = ("http", "https")
PACKAGES = {"s3": "s3fs (pip install 'avbalance[s3]')", "gcs": "gcsfs (pip install "
            "'avbalance[gcs]')", "http": "aiohttp", "https": "aiohttp"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
REMOTE_BLOCK = 8 << 20  # bytes per ranged GET while a tar streams from s3/gs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _gcs_emulator_fs():
    """gcsfs for a GCS emulator (STORAGE_EMULATOR_HOST): the JSON-API class, anonymous.

    The default class of recent gcsfs (`ExtendedGcsFileSystem`, seen in 2026.10) first asks
    the Storage Control gRPC API for the bucket's layout, again on every call while that
    fails; an emulator speaks only the JSON API, so each open or write waited out a 60 s
    retry. Anonymous, as google-cloud-storage's own client is when that variable is set.
    """
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(token="anon")


def is_remote(location: str) -> bool:
    return bool(_SCHEME.match(str(location))) and "://" in str(location)


class Store:
    """A shard set's prefix; `local` stores use plain files, the others fsspec."""

    def __init__(self, location: str):
        location = str(location)
        match = _SCHEME.match(location)
        if match and (len(match.group(1)) > 1 or "://" in location):  # C:\... stays a path
            scheme = match.group(1).lower()
            if scheme not in REMOTE_SCHEMES or not location[match.end():].startswith("//"):
                raise UserError(f"{location}: unsupported location; use a local folder, "
                                "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or https://HOST/PATH")
            rest = location[match.end() + 2:].strip("/")
            host = rest.split("/", 1)[0]
            if not host or any(c in rest for c in "?#\\") or any(
                    p in (".", "..") for p in rest.split("/")):
                raise UserError(f"{location}: not a usable {scheme}:// location (it needs a "
                                "bucket or host, and no '..', '?' or '#')")
            self.scheme = scheme
            self.protocol = REMOTE_SCHEMES[scheme]
            self.root = f"{scheme}://{rest}"
        else:
            self.scheme = self.protocol = None
            self.root = location.rstrip("/") or location
        self.location = location
        self._fs, self._fs_pid = None, None

    @classmethod
    def at(cls, location: str) -> Store:
        return location if isinstance(location, Store) else cls(location)

    def __getstate__(self):  # a filesystem object does not travel to workers; it is remade
        return {**self.__dict__, "_fs": None, "_fs_pid": None}

    @property
    def local(self) -> bool:
        return self.scheme is None

    @property
    def writable(self) -> bool:
        return self.scheme not in READ_ONLY_SCHEMES

    @property
    def fs(self):
        # one instance per process: a forked loader worker must not reuse its parent's, whose
        # event loop thread does not exist in the child (it would hang on the first read)
        if self._fs is None or self._fs_pid != os.getpid():
            try:
                import fsspec

                self._fs = (_gcs_emulator_fs() if self.protocol == "gcs"
                            and os.environ.get("STORAGE_EMULATOR_HOST")
                            else fsspec.filesystem(self.protocol))
                self._fs_pid = os.getpid()
            except ImportError:
                raise UserError(f"{self.location}: reading {self.scheme}:// needs "
                                f"{PACKAGES[self.protocol]}") from None
        return self._fs

    # -- names -----------------------------------------------------------------------------

    def check_name(self, name, source: str = "index.json") -> str:
        name = str(name)
        if not _NAME.match(name):
            raise UserError(f"{self.location}/{source}: member name {name!r} does not resolve "
                            "under the shard set's prefix (only relative names of letters, "
                            "digits, '.', '_', '-' without '..')")
        return name

    def url(self, name: str, source: str = "index.json") -> str:
        name = self.check_name(name, source)
        return os.path.join(self.root, name) if self.local else f"{self.root}/{name}"

    def inside(self, url: str) -> bool:
        """`url` is one of this store's member URLs (as `url()` makes them)."""
        prefix = self.root.rstrip("/") + ("/" if not self.local else os.sep)
        return url.startswith(prefix) and bool(_NAME.match(url[len(prefix):].replace(os.sep,
                                                                                        "/")))

    # -- errors ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def errors(self, what: str):
        """Remote failures as one line naming the object; local ones stay OSErrors."""
        try:
            yield
        except UserError:
            raise
        except FileNotFoundError:
            if self.local:
                raise
            raise UserError(f"{what}: not found") from None
        except PermissionError as exc:
            if self.local:
                raise
            raise UserError(f"{what}: access denied ({_first_line(exc)})") from None
        except Exception as exc:  # unreachable endpoint, bad credentials, HTTP errors, ...
            if self.local and isinstance(exc, OSError):
                raise
            raise UserError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from None

    # -- reading ---------------------------------------------------------------------------

    def open_read(self, name: str, *, stream: bool = True):
        """A binary file object that reads the member front to back (ranged GETs of
        REMOTE_BLOCK bytes on s3/gs, one streamed GET on http)."""
        url = self.url(name)
        if self.local:
            return open(url, "rb")
        with self.errors(url):
            if self.protocol in ("http", "https"):
                return self.fs.open(url, "rb", block_size=0 if stream else None)
            return self.fs.open(url, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")

    def read_bytes(self, name: str) -> bytes:
        url = self.url(name)
        if self.local:
            with open(url, "rb") as fh:
                return fh.read()
        with self.errors(url):
            return self.fs.cat_file(url)

    def read_json(self, name: str):
        url = self.url(name)
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise UserError(f"{url}: not valid JSON ({exc})") from None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        """Bytes of a member, None when there is none."""
        url = self.url(name)
        if self.local:
            return os.path.getsize(url) if os.path.isfile(url) else None
        with self.errors(url):
            self.fs.invalidate_cache(url)  # another process may have written it since
            try:
                info = self.fs.info(url)
            except FileNotFoundError:
                return None
            if info.get("type") == "directory":
                return None
            return int(info["size"]) if info.get("size") is not None else -1

    def names(self) -> set[str]:
        """Every member under the prefix (relative names); http cannot list and says so."""
        if self.local:
            out = set()
            for folder, _, files in os.walk(self.root):
                rel = os.path.relpath(folder, self.root)
                out.update(f if rel == "." else f"{rel}/{f}" for f in files)
            return out
        if not self.writable:
            raise UserError(f"{self.location}: an http(s) location cannot be listed")
        with self.errors(self.root):
            self.fs.invalidate_cache(self.root)
            try:
                found = self.fs.find(self.root, withdirs=False)
            except FileNotFoundError:
                return set()
        base = self.root.split("://", 1)[1].rstrip("/") + "/"
        return {p.split("://", 1)[-1][len(base):] for p in found
                if p.split("://", 1)[-1].startswith(base)}

    # -- writing (local folders, s3, gs) ---------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise UserError(f"{self.location}: {self.scheme}:// is read-only; write shards to "
                            "a local folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Whole or not at all: a temporary name renamed locally, one PUT remotely."""
        self._writable()
        url = self.url(name)
        if self.local:
            tmp = f"{url}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, url)
            return
        with self.errors(url):
            self.fs.pipe_file(url, data)

    def write_json(self, name: str, data) -> None:
        self.write_bytes(name, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))

    def put_file(self, local_path: str, name: str) -> None:
        """Upload a finished local file; an object appears only once the upload is complete."""
        self._writable()
        url = self.url(name)
        if self.local:
            os.replace(local_path, url)
            return
        with self.errors(url):
            self.fs.put_file(local_path, url)

    def remove(self, name: str) -> None:
        url = self.url(name)
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.remove(url)
            return
        with self.errors(url):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(url)


# --- the loader's way in: one tar, streamed, optionally cached ------------------------------


class _TeeReader:
    """Reads a remote stream and copies what it reads into a temporary cache file; `finish()`
    reads the rest (the tar's end padding) and renames the copy into the cache."""

    def __init__(self, stream, tmp: str, final: str, expected: int | None, cache: ShardOpener):
        self.stream, self.tmp, self.final = stream, tmp, final
        self.expected, self.cache = expected, cache
        self.copy = open(tmp, "wb")
        self.written = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.copy is not None:
            self.copy.write(data)
            self.written += len(data)
        return data

    def readable(self) -> bool:
        return True

    def finish(self) -> None:
        if self.copy is None:
            return
        while True:
            data = self.stream.read(1 << 20)
            if not data:
                break
            self.copy.write(data)
            self.written += len(data)
        self.copy.close()
        self.copy = None
        if self.expected is None or self.written == self.expected:
            os.replace(self.tmp, self.final)
            self.cache.evict(keep=self.final)
        else:
            os.remove(self.tmp)

    def close(self) -> None:
        if self.copy is not None:  # stopped part-way: nothing half-read enters the cache
            self.copy.close()
            self.copy = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)
        self.stream.close()


class ShardOpener:
    """Opens a shard tar by URL for the loader: only URLs under the store's prefix; remote
    ones streamed, and with `cache_dir` copied into a cache of at most `cache_size` bytes
    (least recently used tars evicted) while they stream, so a later epoch reads them locally.
    """

    def __init__(self, store: Store, cache_dir: str | None = None, cache_size: int | None = None,
                 sizes: dict[str, int] | None = None):
        self.store = store
        self.cache_dir = cache_dir if cache_dir and not store.local else None
        self.cache_size = cache_size or (10 << 30)
        self.sizes = sizes or {}
        self.warned_ranges = False  # a server that ignores Range is named once per process
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)

    def _name(self, url: str) -> str:
        if not self.store.inside(url):
            raise UserError(f"{url}: not under the shard set {self.store.location}")
        prefix = self.store.root.rstrip("/") + ("/" if not self.store.local else os.sep)
        return url[len(prefix):].replace(os.sep, "/")

    def _cached(self, url: str, name: str) -> str:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
        return os.path.join(self.cache_dir, f"{digest}-{os.path.basename(name)}")

    def _hit(self, final: str, expected: int | None) -> bool:
        if os.path.isfile(final) and (expected is None or os.path.getsize(final) == expected):
            with contextlib.suppress(OSError):
                os.utime(final)
            return True
        return False

    def __call__(self, url: str):
        name = self._name(url)
        if not self.cache_dir:
            return self.store.open_read(name)
        expected = self.sizes.get(name)
        final = self._cached(url, name)
        if self._hit(final, expected):
            return open(final, "rb")
        stream = self.store.open_read(name)
        if expected is not None and expected > self.cache_size:
            return stream  # never fits: stream it every time
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.cache_dir)
        os.close(fd)
        return _TeeReader(stream, tmp, final, expected, self)

    def local_path(self, url: str, fetch: bool = True) -> str | None:
        """A local file holding the tar, for random access: the tar itself in a folder; the
        cached copy of a remote one (with `fetch`, read whole into the cache first, once, if
        it fits); None when there is none (read byte ranges then)."""
        name = self._name(url)
        if self.store.local:
            return url
        if not self.cache_dir:
            return None
        expected = self.sizes.get(name)
        final = self._cached(url, name)
        if self._hit(final, expected):
            return final
        if not fetch:
            return None
        stream = self(url)
        try:
            if not isinstance(stream, _TeeReader):  # too large for the cache
                return None
            stream.finish()
        finally:
            stream.close()
        return final if os.path.isfile(final) else None

    def read_range(self, url: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of a tar: one ranged GET on s3/gs/https."""
        name = self._name(url)
        if self.store.local:
            with open(url, "rb") as fh:
                return os.pread(fh.fileno(), length, offset)
        with self.store.errors(url):
            data = self.store.fs.cat_file(self.store.url(name), start=offset,
                                          end=offset + length)
        if len(data) == length:
            return data
        if len(data) >= offset + length:  # the server ignored Range and sent the whole tar
            if not self.warned_ranges:
                self.warned_ranges = True
                print(f"Warning: {self.store.root} ignores byte ranges, so every sample "
                      "downloads its whole tar; give --cache-dir to fetch each tar once",
                      file=sys.stderr, flush=True)
            return data[offset:offset + length]
        raise UserError(f"{url}: asked for {length} bytes at {offset}, got {len(data)} (the "
                        "tar is shorter than its stats say; `avprep verify` checks the set)")

    def evict(self, keep: str | None = None) -> None:
        """Remove the least recently used cached tars until the cache fits its size."""
        entries = []
        for entry in os.scandir(self.cache_dir):
            if entry.name.startswith(".part-") or not entry.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.cache_size:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size


def finish_stream(stream) -> None:
    """Called when a tar was read to its end: completes a cached copy, if one is being made."""
    if isinstance(stream, _TeeReader):
        stream.finish()


def local_scratch() -> str:
    """A private local folder for a shard being written before its upload."""
    return tempfile.mkdtemp(prefix="avbalance-shard-")


def remove_scratch(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
