"""Content-addressed blobs: a local folder on one machine, an S3-compatible bucket in a cluster.

A blob is named by the sha256 of its bytes, so a put is idempotent and a reader can check what it got.
`put` returns only when the bytes are durable: on a folder, written to a temp file, fsynced, renamed and the
directory fsynced; on S3, when the server has answered the PUT (S3 acknowledges a PUT once it is stored).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from kernos.abi.errors import StatusError

from .durable import fsync_dir


def put_tree(blobs, folder: Path) -> dict[str, str]:
    """Store every file under `folder`; its manifest (relative path -> sha256), which `get_tree` brings back."""
    manifest = {}
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = f.read_bytes()
        manifest[str(f.relative_to(folder))] = digest = hashlib.sha256(data).hexdigest()
        blobs.put(digest, data)
    return manifest


def get_tree(blobs, manifest: dict[str, str], folder: Path, what: str) -> None:
    """Write a manifest's files under `folder`, each checked against its digest (`DATA_LOSS` naming `what` if one
    is corrupt). The caller writes to a temporary folder and renames it, so a reader never sees half of one."""
    for rel, digest in manifest.items():
        data = blobs.get(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise StatusError("DATA_LOSS", f"{what}: {rel} is corrupt")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


class LocalBlobs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, digest: str, data: bytes) -> None:
        final = self._path(digest)
        if final.exists() and final.stat().st_size == len(data):
            return
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def get(self, digest: str) -> bytes:
        try:
            return self._path(digest).read_bytes()
        except FileNotFoundError:
            raise StatusError("DATA_LOSS", f"blob {digest[:12]} is missing") from None


class _Cache:
    """Blobs never change (their name is their digest), so a node may keep copies of what it read or wrote: reads
    of hot files skip the object store. Bounded by bytes; the least recently used go first."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._items.get(digest)
            if data is not None:
                self._items.move_to_end(digest)
            return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 8:
            return                                  # a few big blobs would push out every small one
        with self._lock:
            if digest in self._items:
                return
            self._items[digest] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)


class S3Blobs:
    """`url` is s3://bucket/prefix; `endpoint` the server (empty: AWS). Credentials come the way boto3 finds them
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role). The bucket is created if missing.
    `cache_bytes`: blobs this node read or wrote kept in memory (0: none)."""

    def __init__(self, url: str, endpoint: str = "", region: str = "us-east-1", cache_bytes: int = 64 << 20):
        import boto3
        from botocore.config import Config

        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"an object store is s3://bucket[/prefix], got {url!r}")
        self.bucket, _, prefix = url[5:].partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._s3 = boto3.client("s3", endpoint_url=endpoint or None, region_name=region,
                                config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                              connect_timeout=10, read_timeout=60))
        self._errors = self._s3.exceptions
        self._cache = _Cache(cache_bytes) if cache_bytes > 0 else None
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except self._errors.ClientError:
            try:
                self._s3.create_bucket(Bucket=self.bucket)
            except (self._errors.BucketAlreadyOwnedByYou, self._errors.BucketAlreadyExists):
                pass

    def _key(self, digest: str) -> str:
        return f"{self.prefix}{digest[:2]}/{digest}"

    def put(self, digest: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(digest), Body=data)
        if self._cache is not None:
            self._cache.put(digest, data)

    def get(self, digest: str) -> bytes:
        data = self._cache.get(digest) if self._cache is not None else None
        if data is not None:
            return data
        try:
            data = self._s3.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"].read()
        except self._errors.NoSuchKey:
            raise StatusError("DATA_LOSS", f"blob {digest[:12]} is missing from s3://{self.bucket}") from None
        if self._cache is not None and hashlib.sha256(data).hexdigest() == digest:   # only what is whole
            self._cache.put(digest, data)
        return data
