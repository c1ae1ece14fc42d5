"""Artifact stores: where published files live. `LocalStore` (a folder) and `S3Store` (boto3).

Keys are relative POSIX paths ("name/version/file"). `open_artifact_store()` reads
`VPTQ_ARTIFACTS`: unset -> a folder in VPTQ_HOME; `s3://bucket/prefix` -> S3 (MinIO or any S3
endpoint through the standard `AWS_ENDPOINT_URL`; credentials only from boto3's normal chain).

`put_bytes_exclusive` is the registry's commit point: it creates a key only if it does not exist
(local: a complete temp file hard-linked into place, which fails when the name is taken; S3: a
conditional PUT with `If-None-Match: *`), so two publishers of one version cannot both commit even
without a database. Local files and folders honour the umask (a store shared by a group works).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from vptq_service.store.durable import current_umask, fsync_dir
from vptq_service.store.errors import StoreError, mask_url

log = logging.getLogger(__name__)

_S3_HELP = "expected s3://bucket/optional/prefix (credentials come from AWS_* variables or a profile)"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
MiB = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime  # aware UTC: how old an orphan is (gc's grace period)


class ArtifactStore(ABC):
    """A flat key -> bytes store with atomic writes of whole objects."""

    uri: str  # where keys live, without credentials

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_bytes_exclusive(self, key: str, data: bytes) -> bool:
        """Create key with data only if it does not exist (atomically); False when it already did."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under prefix with its size and modification time, including leftovers of
        interrupted writes (gc removes those); sorted by key."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download key to path; StoreError(missing) when the key does not exist."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """All keys under prefix (a folder-like "a/b/"), sorted."""

    @abstractmethod
    def delete_key(self, key: str) -> None:
        """Delete one object (no error when it is absent)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under prefix; returns how many."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreError when the store cannot be used (missing bucket, unreachable endpoint)."""

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise StoreError(f"invalid artifact key {key!r}")
    return key


def _entries(base: Path) -> Iterator[Path]:
    """Every entry under base that is not a folder (symlinks included, never followed). A folder that
    another process removes while this walks (a publisher dropping its staging prefix, a gc) is skipped:
    os.walk ignores it, where pathlib's rglob raised FileNotFoundError."""
    for top, dirs, files in os.walk(base):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            yield Path(top, name)


class LocalStore(ArtifactStore):
    """Artifacts in a local folder; each object is written to a temp file and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _temp_beside(self, dest: Path, writer) -> str:
        """A complete, fsynced temp file in dest's folder, with the mode a plain create would get."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _write(self, key: str, writer) -> None:
        dest = self._path(key)
        tmp = self._temp_beside(dest, writer)
        try:
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    def put_file(self, key: str, path: Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 4 * MiB)

        self._write(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def put_bytes_exclusive(self, key: str, data: bytes) -> bool:
        # link() of a complete temp file: readers never see a partial object and the name is
        # taken by exactly one writer (EEXIST for the others), also over NFSv3+.
        dest = self._path(key)
        tmp = self._temp_beside(dest, lambda f: f.write(data))
        try:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # no hard links here: an O_EXCL marker decides who commits, then the rename
                try:  # a .tmp- name: never listed as an object of the artifact
                    lock = dest.with_name(f".tmp-lock-{dest.name}")
                    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                except FileExistsError:
                    return False
                if dest.exists():
                    return False
                os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(dest.parent)
        return True

    def list_objects(self, prefix: str) -> list[StoredObject]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in _entries(base):
            try:
                st = p.lstat()
            except FileNotFoundError:  # removed while listing
                continue
            out.append(StoredObject(p.relative_to(self.root).as_posix(), st.st_size,
                                    datetime.fromtimestamp(st.st_mtime, UTC)))
        return sorted(out, key=lambda o: o.key)

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"{self.uri_of(key)} is missing")
        shutil.copyfile(src, path)

    def get_bytes(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in _entries(base)
                      if p.is_file() and not p.name.startswith(".tmp-"))

    def delete_key(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/"))
        n = len(self.list_objects(prefix))
        if base.is_dir():
            shutil.rmtree(base, ignore_errors=True)
        self._prune(base.parent)
        return n

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty up to the root (S3 has no folders: keep listings alike)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create artifact folder {self.root}: {e.strerror}; fix VPTQ_ARTIFACTS or VPTQ_HOME") from None


class S3Store(ArtifactStore):
    """Artifacts in an S3 bucket under a prefix; big files go through boto3's transfer manager."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB,
                 max_concurrency: int = 8, max_attempts: int = 3) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # endpoint_url None lets botocore read AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself.
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url,
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": max_attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}))
        self.endpoint = mask_url(self._client.meta.endpoint_url)
        # Multipart above the threshold, parts uploaded/downloaded concurrently.
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                        max_concurrency=max_concurrency, use_threads=True)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, e: Exception, what: str) -> StoreError:
        """Translate boto errors into one actionable line (never with credentials)."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or AWS_PROFILE)")
        if isinstance(e, EndpointConnectionError):
            return StoreError(f"cannot reach S3 endpoint {self.endpoint}: check AWS_ENDPOINT_URL and that the "
                              "server is running")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (code == "404" and what == "check bucket"):  # HEAD has no body
                return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it or fix "
                                  "VPTQ_ARTIFACTS")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(f"access to s3://{self.bucket} denied ({code}) at {self.endpoint}: check the "
                                  "AWS credentials and the bucket policy")
            return StoreError(f"S3 error {code} on {what} at {self.endpoint}")
        from botocore.exceptions import BotoCoreError

        if isinstance(e, BotoCoreError):
            return StoreError(f"S3 failure on {what} at {self.endpoint}: {type(e).__name__}")
        return StoreError(f"S3 failure on {what}: {type(e).__name__}")

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as e:
            raise self._fail(e, what) from None

    def put_file(self, key: str, path: Path) -> None:
        self._call(f"upload {key}", self._client.upload_file, str(path), self.bucket, self._key(key),
                   Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"upload {key}", self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_bytes_exclusive(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False  # taken (or a concurrent conditional write is winning it)
            if code not in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                raise self._fail(e, f"upload {key}") from None
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import BotoCoreError

            if isinstance(e, BotoCoreError):
                raise self._fail(e, f"upload {key}") from None
            raise
        # An endpoint without conditional writes: check, then write (the database reservation,
        # taken before any upload, is what makes this exclusive there).
        log.warning("S3 endpoint %s does not support conditional writes (If-None-Match); %s is committed "
                    "with a check-then-write", self.endpoint, key)
        if self.get_bytes(key) is not None:
            return False
        self.put_bytes(key, data)
        return True

    def list_objects(self, prefix: str) -> list[StoredObject]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        strip = len(f"{self.prefix}/") if self.prefix else 0
        out: list[StoredObject] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        for page in self._call(f"list {prefix or '/'}", list, pages):
            out.extend(StoredObject(o["Key"][strip:], int(o.get("Size", 0)), o["LastModified"].astimezone(UTC))
                       for o in page.get("Contents", []))
        return sorted(out, key=lambda o: o.key)

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                raise StoreError(f"{self.uri_of(key)} is missing") from None
            raise self._fail(e, f"download {key}") from None
        except Exception as e:  # noqa: BLE001 - botocore/s3transfer raise several families
            from botocore.exceptions import BotoCoreError

            if isinstance(e, BotoCoreError):
                raise self._fail(e, f"download {key}") from None
            raise

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return None
            raise self._fail(e, f"download {key}") from None
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import BotoCoreError

            if isinstance(e, BotoCoreError):
                raise self._fail(e, f"download {key}") from None
            raise

    def list_keys(self, prefix: str) -> list[str]:
        return [o.key for o in self.list_objects(prefix)]  # one S3 listing: the keys of list_objects

    def delete_key(self, key: str) -> None:
        self._call(f"delete {key}", self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            self._call(f"delete {prefix}", self._client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def check(self) -> None:
        self._call("check bucket", self._client.head_bucket, Bucket=self.bucket)


def parse_artifacts_url(raw: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix); StoreError naming the problem otherwise."""
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise StoreError(f"VPTQ_ARTIFACTS {mask_url(raw)!r} is not a URL; {_S3_HELP}") from None
    if parts.scheme != "s3":
        raise StoreError(f"VPTQ_ARTIFACTS {mask_url(raw)!r}: unsupported scheme {parts.scheme!r}; {_S3_HELP} "
                         "or an absolute folder path")
    if "@" in parts.netloc:
        raise StoreError(f"VPTQ_ARTIFACTS {mask_url(raw)!r} carries credentials: remove them and use "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE", parts.password)
    bucket = parts.netloc
    if not _BUCKET.match(bucket or ""):
        raise StoreError(f"VPTQ_ARTIFACTS {raw!r}: {bucket!r} is not a valid bucket name "
                         f"(3-63 of a-z 0-9 . -); {_S3_HELP}")
    if parts.query or parts.fragment:
        raise StoreError(f"VPTQ_ARTIFACTS {mask_url(raw)!r}: no ?query or #fragment allowed; {_S3_HELP}")
    return bucket, parts.path.strip("/")


def open_artifact_store(raw: str | None = None, **s3_options) -> ArtifactStore:
    """The store named by raw (default: VPTQ_ARTIFACTS, else VPTQ_HOME/artifacts)."""
    raw = os.environ.get("VPTQ_ARTIFACTS", "").strip() if raw is None else raw.strip()
    if not raw:
        from vptq_service.store.db import vptq_home

        return LocalStore(vptq_home() / "artifacts")
    if raw.startswith("file://"):
        return LocalStore(Path(urlsplit(raw).path))
    if "://" not in raw and raw.startswith(("/", "~")):
        return LocalStore(Path(raw))
    bucket, prefix = parse_artifacts_url(raw)
    return S3Store(bucket, prefix, **s3_options)
