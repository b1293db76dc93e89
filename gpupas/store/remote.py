"""A remote store through fsspec (S3 and S3-compatible servers first).

Reads fetch byte ranges, never a whole shard to get one chunk. Atomic writes use S3's
conditional requests: create-if-absent is a PUT with ``If-None-Match: *``; read-modify-write is a
GET that remembers the ETag and a PUT with ``If-Match`` (retried when another writer won).
Filesystems without conditional writes can be read but refuse those two operations.

A conditional PUT carries a random token in its object metadata: when its response is lost and the client
sends it again, the retry is refused (the key now exists, or its ETag moved) and the token tells that the
write that landed was this one, not another writer's.
"""

from __future__ import annotations

import io
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from gpupas.errors import BackendUnavailableError, GpupasError, InvalidInputError
from gpupas.store.base import buffers

_RETRIES = 50
MERGE_BYTES = 8 << 20  # touching ranges are fetched together up to this (one request, not one a chunk)
_TOKEN = "gpupas-write"  # object metadata: which conditional write put the object there


def _codes(exc: BaseException) -> set[str]:
    """The S3 error codes and HTTP statuses of ``exc`` and of the errors it was raised from (s3fs
    turns a botocore ClientError into a builtin OSError and keeps the original as its cause)."""
    codes: set[str] = set()
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            codes.add(str(response.get("Error", {}).get("Code", "")))
            codes.add(str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
        seen = seen.__cause__ or seen.__context__
    return codes


def _conflict(exc: BaseException) -> bool:
    """A concurrent conditional write to the same key (409): try again."""
    return bool(_codes(exc) & {"ConditionalRequestConflict", "409"}) or "ConditionalRequestConflict" in str(exc)


def _precondition_failed(exc: BaseException) -> bool:
    """The condition did not hold (412: the key exists, or its ETag moved), or a concurrent
    conditional write (409). s3fs raises FileExistsError or OSError(EINVAL) for these."""
    if _codes(exc) & {"PreconditionFailed", "412"} or _conflict(exc):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("PreconditionFailed", "pre-conditions you specified did not hold"))


def _no_conditional_writes(location: str, exc: BaseException) -> GpupasError | None:
    """The error for a server that does not implement conditional PUTs (501 NotImplemented to If-None-Match or
    If-Match), naming what is missing: no credentials or retry fix it. None for any other failure."""
    if not (_codes(exc) & {"NotImplemented", "501"}):
        return None
    return GpupasError(f"{location}: the server does not support conditional writes (PUT with If-None-Match / "
                       f"If-Match: {exc}), which gpupas needs to write an archive atomically; it can still be read. "
                       "Write to AWS S3 or a server that implements them, or to a local directory; nothing was "
                       "changed")


def _unsatisfiable(exc: BaseException) -> bool:
    """A range that starts at or past the end of the object (416): no bytes there."""
    return bool(_codes(exc) & {"InvalidRange", "416"}) or "range is not satisfiable" in str(exc)


class RemoteStore:
    """Keys are objects under the URL's path."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None, durable: bool = True):
        import fsspec

        self.storage_options = dict(storage_options or {})  # as given: what a worker process opens it with
        opts = {"use_listings_cache": False, "skip_instance_cache": True} | self.storage_options
        try:
            self.fs, path = fsspec.core.url_to_fs(url, **opts)
        except ImportError as exc:
            raise BackendUnavailableError(f"cannot open {url}: {exc}; for s3:// install gpupas[s3]") from None
        except ValueError as exc:  # fsspec knows no such protocol (a typo in the URL, say)
            raise InvalidInputError(f"cannot open {url}: {exc}; give a local path or an s3:// URL") from None
        self.root = path.rstrip("/")
        self.location = url
        self.local_root: str | None = None
        self.durable = durable
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.s3 = any(p in ("s3", "s3a") for p in protocols)
        self.requests = 0  # calls made to the server: tests count them
        self.bytes_read = 0  # bytes the read calls returned (object bodies fetched)
        self._counter = threading.Lock()

    def _count(self, data: Any) -> Any:
        """``data`` (bytes, or a list of them) after counting its bytes as read."""
        n = sum(len(b) for b in data) if isinstance(data, list) else len(data)
        with self._counter:
            self.bytes_read += n
        return data

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _call(self, name: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        self.requests += 1
        return sync(self.fs.loop, self.fs._call_s3, name, **kwargs)

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, rest = self._p(key).partition("/")
        return bucket, rest

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        self.requests += 1
        try:
            return self._count(self.fs.cat_file(self._p(key)))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def get_range(self, key: str, start: int, length: int | None) -> bytes | None:
        if length is not None and length <= 0:  # an HTTP Range cannot ask for no bytes (S3 sends them all)
            return b"" if self.exists(key) else None
        self.requests += 1
        try:
            if start < 0:  # a suffix range: the last -start bytes, then at most length of them
                data = self.fs.cat_file(self._p(key), start=start)
                data = data if length is None else data[:length]
            else:
                data = self.fs.cat_file(self._p(key), start=start, end=None if length is None else start + length)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not _unsatisfiable(exc):
                raise
            data = b""  # the range starts past the end (or the object is empty), as a local file reads
        return self._count(data)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, length)`` of ``key``; ranges that touch (a stream's consecutive
        chunks) are fetched as one request of at most :data:`MERGE_BYTES` (no byte more is read)."""
        out = [b""] * len(ranges)
        wanted = sorted((i for i, (_, n) in enumerate(ranges) if n > 0), key=lambda i: ranges[i][0])
        if not wanted:  # an empty range is not asked for (see get_range)
            return out
        runs: list[list[int]] = []  # indexes of ranges fetched by one request
        spans: list[tuple[int, int]] = []  # and the bytes it asks for
        for i in wanted:
            a, n = ranges[i]
            if spans and spans[-1][0] <= a <= spans[-1][1] and max(spans[-1][1], a + n) - spans[-1][0] <= MERGE_BYTES:
                runs[-1].append(i)
                spans[-1] = (spans[-1][0], max(spans[-1][1], a + n))
                continue
            runs.append([i])
            spans.append((a, a + n))
        self.requests += len(runs)
        path = self._p(key)
        got = self.fs.cat_ranges([path] * len(runs), [a for a, _ in spans], [b for _, b in spans])
        for run, (a, _), r in zip(runs, spans, got):
            if isinstance(r, BaseException):
                if not isinstance(r, FileNotFoundError) and not _unsatisfiable(r):  # gone: reads as nothing
                    raise r
                r = b""
            for i in run:  # a range past the object's end reads short, as from a local file
                start = ranges[i][0] - a
                out[i] = r[start : start + ranges[i][1]] if len(run) > 1 else r
        return self._count(out)

    def exists(self, key: str) -> bool:
        self.requests += 1
        try:
            return self.fs.isfile(self._p(key))
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int | None:
        self.requests += 1
        try:
            return int(self.fs.size(self._p(key)))
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        self.requests += 1
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(prefix), detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def age(self, prefix: str) -> float | None:
        self.requests += 1
        try:
            found = self.fs.find(self._p(prefix), detail=True, withdirs=False)
        except FileNotFoundError:
            return None
        stamps = []
        for info in found.values():
            t = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
            if isinstance(t, datetime):
                stamps.append(t.timestamp())
            elif isinstance(t, (int, float)):
                stamps.append(float(t))
        return max(0.0, time.time() - max(stamps)) if stamps else None

    # -- writes ------------------------------------------------------------------------------------------
    def put(self, key: str, data: bytes, sync: bool = True) -> None:
        self.requests += 1
        self.fs.pipe_file(self._p(key), data)

    def create(self, key: str, data: bytes) -> bool:
        if self.s3:
            bucket, k = self._bucket_key(key)
            token = uuid.uuid4().hex
            for attempt in range(_RETRIES):
                try:
                    self._call("put_object", Bucket=bucket, Key=k, Body=data, IfNoneMatch="*",
                               Metadata={_TOKEN: token})
                except Exception as exc:
                    if _conflict(exc):  # raced another conditional write that may yet fail: ask again
                        time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
                        continue
                    if _precondition_failed(exc):  # it exists: by an earlier try of ours whose response was lost?
                        return self._token(bucket, k) == token
                    if (unsupported := _no_conditional_writes(self.location, exc)) is not None:
                        raise unsupported from None
                    raise
                return True
            raise GpupasError(f"{self.location}: {key} kept conflicting under {_RETRIES} tries to create it")
        self.requests += 1
        try:
            with self.fs.open(self._p(key), "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as exc:
            raise GpupasError(f"{self.location}: this file system cannot create a file atomically ({exc}); "
                              "use a local directory or S3") from None
        return True

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        if not self.s3:
            raise GpupasError(f"{self.location}: atomic replace needs S3 conditional writes; use a local directory "
                              "or S3 for archives that are written")
        bucket, k = self._bucket_key(key)
        token = uuid.uuid4().hex
        for attempt in range(_RETRIES):
            old, etag, written_by = self._get_with_etag(bucket, k)
            if attempt and written_by == token:  # an earlier try landed, but its response was lost (and its retry
                return old  # refused): that value is this update's, not another writer's
            new = change(old)
            if new is None:
                return old
            cond = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self._call("put_object", Bucket=bucket, Key=k, Body=new, Metadata={_TOKEN: token}, **cond)
                return new
            except FileNotFoundError:  # If-Match on a key deleted since it was read (S3: 404): read it again
                if etag is None:
                    raise
            except Exception as exc:
                if (unsupported := _no_conditional_writes(self.location, exc)) is not None:
                    raise unsupported from None
                if not _precondition_failed(exc):
                    raise
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))  # jittered backoff under contention
        raise GpupasError(f"{self.location}: {key} kept changing under {_RETRIES} tries to update it")

    @contextmanager
    def lock(self, prefix: str, exclusive: bool = False) -> Iterator[None]:
        """Object stores have no locks: callers that need one fall back to ages (see ArchiveStore.gc)."""
        yield

    def _get_with_etag(self, bucket: str, key: str) -> tuple[bytes | None, str | None, str | None]:
        """The value of ``key``, its ETag and the token of the conditional write that put it there."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes | None, str | None, str | None]:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None, None
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"], (resp.get("Metadata") or {}).get(_TOKEN)

        self.requests += 1
        data, etag, token = sync(self.fs.loop, get)
        if data is not None:
            self._count(data)
        return data, etag, token

    def _token(self, bucket: str, key: str) -> str | None:
        """The token of the conditional write that put ``key`` there (None: gone, or put otherwise)."""
        try:
            resp = self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return (resp.get("Metadata") or {}).get(_TOKEN)

    def delete(self, key: str) -> None:
        self.requests += 1
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        self.requests += 1
        try:
            self.fs.rm(self._p(prefix), recursive=True)
        except FileNotFoundError:
            pass

    def writer(self, key: str) -> RemoteWriter:
        self.requests += 1
        return RemoteWriter(self.fs.open(self._p(key), "wb"))

    def sync(self, keys: Sequence[str]) -> None:
        """Nothing to do: an object is durable once its PUT returned."""

    # -- what the catalog and stats need ---------------------------------------------------------------
    def get_stat(self, key: str) -> tuple[bytes, tuple[int, int, int]] | None:
        """The value of ``key`` and a fingerprint (ETag hash, mtime in ns, size) from one GET."""
        if not self.s3:
            data = self.get(key)
            return None if data is None else (data, (hash(data) & (2**62 - 1), 0, len(data)))
        from fsspec.asyn import sync

        bucket, k = self._bucket_key(key)

        async def get() -> tuple[bytes, tuple[int, int, int]] | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=k)
            except FileNotFoundError:
                return None
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, _fingerprint(resp.get("ETag"), resp.get("LastModified"), len(data))

        self.requests += 1
        got = sync(self.fs.loop, get)
        if got is not None:
            self.bytes_read += len(got[0])
        return got

    def stat_children(self, prefix: str) -> dict[str, tuple[int, int, int]]:
        """Fingerprint (ETag hash, mtime in ns, size) of each object directly under ``prefix``."""
        self.requests += 1
        try:
            found = self.fs.ls(self._p(prefix), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in found:
            if info.get("type") != "file":
                continue
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            out[name] = _fingerprint(info.get("ETag"), info.get("LastModified"), int(info.get("size", 0)))
        return out

    def usage(self, prefix: str) -> int:
        """Bytes of every object under ``prefix`` ("" for the whole archive)."""
        self.requests += 1
        try:
            return int(self.fs.du(self._p(prefix), total=True))
        except FileNotFoundError:
            return 0


def _fingerprint(etag: Any, modified: Any, size: int) -> tuple[int, int, int]:
    import zlib

    tag = zlib.crc32(str(etag).encode())
    ns = int(modified.timestamp() * 1e9) if isinstance(modified, datetime) else 0
    return tag, ns, size

class RemoteWriter:
    """One object written front to back (fsspec streams it in parts); appends are serialized."""

    def __init__(self, f: io.IOBase):
        self.f: Any = f  # (an fsspec buffered file: ``discard``, a settable ``closed``)
        self._lock = threading.Lock()
        self._size = 0

    def append(self, data: Any) -> int:
        with self._lock:
            offset = self._size
            for view in buffers(data):
                self.f.write(bytes(view))
                self._size += len(view)
            return offset

    def flush(self) -> None:
        pass

    def close(self, sync: bool = True) -> None:
        self.f.close()

    def abort(self) -> None:
        discard = getattr(self.f, "discard", None)  # fsspec buffered files: drop a multipart upload
        if discard is not None:
            discard()
            self.f.closed = True  # else collecting it closes it: an upload of the discarded buffer (s3fs: an error)
        elif not self.f.closed:
            self.f.close()
