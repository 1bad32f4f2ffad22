"""Run-root storage through fsspec: local paths by default, ``s3://`` through s3fs.

Every write is atomic: on a local filesystem we write a temporary sibling and rename it over the
target; on S3 the object is written straight to its final key by one PUT, which S3 applies whole or
not at all (no temporary key and no copy, which on S3 would be a second, non-atomic step). Objects of
``2 * part_size`` bytes or more (large checkpoints) go up as a multipart upload instead: that too is
all or nothing, since the object only appears when CompleteMultipartUpload succeeds, and s3fs aborts
the upload on an error. A writer killed mid-upload leaves an invisible incomplete upload (it costs
storage until a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` removes it), never a partial
object.

Files that several processes may update (the run manifest) use ``read_versioned`` + ``write_if``, a
compare-and-swap: on S3 a conditional PUT (``If-Match`` on the ETag we read, ``If-None-Match: *`` to
create), locally a compare-before-replace under a lock, so a lost race is a ``WriteConflict`` and
never a silent overwrite.

S3 settings come from the standard AWS chain (environment, ``~/.aws`` profiles, instance roles);
``configure(endpoint_url=...)`` (the run config's ``[storage] endpoint_url``) or the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables point ``s3://`` at MinIO or another
S3-compatible store. ``job_env()`` is what a launched job needs to see the same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PART_SIZE = 50 * 2**20  # s3fs's default: objects below 2 * PART_SIZE are one PUT, larger ones multipart
# botocore's own variable for the S3 endpoint (the AWS CLI and the other SDKs read it too)
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
_S3_PROTOCOLS = ("s3", "s3a")
# Non-secret settings a job needs to reach the same store. Credentials are never copied into a job's
# definition (it may be printed or stored by a scheduler): local jobs inherit the coordinator's
# environment, cluster jobs get them from a Secret or the node's role.
_JOB_ENV = (ENDPOINT_ENV, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


class WriteConflict(RuntimeError):
    """A conditional write lost a race: the object changed (or appeared, or vanished) since it was read."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version token they were read at (S3 ETag, or a local file's sha256)."""

    data: bytes
    version: str


def configure(*, endpoint_url: str | None = None) -> None:
    """Point ``s3://`` at an S3-compatible endpoint for this process and every process it starts.

    Sets ``AWS_ENDPOINT_URL_S3`` (which botocore reads), so subprocesses and TorchX local jobs inherit
    it; ``job_env()`` passes it to jobs on other machines. Clients already made are dropped so the
    next access uses the new endpoint.
    """
    if endpoint_url and os.environ.get(ENDPOINT_ENV) != endpoint_url:
        os.environ[ENDPOINT_ENV] = endpoint_url
        _forget_s3_clients()


def job_env() -> dict[str, str]:
    """Environment a job needs to reach the run root's store as this process does (no secrets)."""
    return {k: os.environ[k] for k in _JOB_ENV if os.environ.get(k)}


def _forget_s3_clients() -> None:
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return
    S3FileSystem.clear_instance_cache()


def is_local(url: str) -> bool:
    return fsspec.core.split_protocol(url)[0] in (None, "file", "local")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL or local path.

    S3 listings are never cached: other processes (expert jobs, another coordinator) write to the run
    root, and a cached listing would hide their files from ``exists`` and ``listdir``.
    """
    protocol = fsspec.core.split_protocol(url)[0]
    options: dict[str, Any] = {}
    if protocol in _S3_PROTOCOLS:
        options["use_listings_cache"] = False
        # fsspec reuses one instance per set of arguments; naming the endpoint here keys that cache on
        # it, so a process whose endpoint changed never gets a client bound to the old one.
        endpoint = os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        if protocol in _S3_PROTOCOLS:
            raise ImportError(
                f"{url}: s3:// run roots need s3fs; install it with: pip install 'ddm[s3]' ({e})"
            ) from None
        raise
    return fs, path


def join(root: str, *parts: str) -> str:
    """Join path parts onto a run root, keeping the URL scheme (``s3://b/run`` + ``x`` -> ``s3://b/run/x``)."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def write_bytes(url: str, data: bytes, *, part_size: int = PART_SIZE) -> None:
    """Atomically replace ``url`` with ``data`` (see the module docstring for how, per store)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # Straight to the final key: object stores have no directories to make (and s3fs's makedirs
        # would create a missing *bucket*, silently, in some region).
        try:
            fs.pipe_file(path, data, chunksize=part_size)
        except FileNotFoundError as e:  # the bucket does not exist
            raise FileNotFoundError(f"{url}: {e}; create the bucket first") from None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def parse_json(raw: bytes, url: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{url}: not valid JSON ({e.msg} at line {e.lineno}); the file is corrupt or truncated"
        ) from None


def read_json(url: str) -> Any:
    return parse_json(read_bytes(url), url)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


# compare-and-swap ------------------------------------------------------------------------------------
def read_versioned(url: str) -> Versioned:
    """The bytes of ``url`` and their version, read together (one GET on S3)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
        return Versioned(data, _digest(data))
    from fsspec.asyn import sync

    data, etag = sync(fs.loop, _s3_get, fs, path, url)
    return Versioned(data, etag)


def write_if(url: str, data: bytes, *, version: str | None) -> str:
    """Write ``data`` to ``url`` only if it is still at ``version`` (``None``: only if it does not exist).

    Returns the new version. Raises ``WriteConflict`` if another writer got there first; nothing is
    written then. On S3 this is one conditional PUT (``If-Match`` / ``If-None-Match: *``), which the
    store checks and applies atomically; locally, compare-before-replace under an exclusive lock on
    the parent directory (``flock``, so it holds between processes on one machine; a local run root
    is not meant to be shared over NFS).
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        with _locked(parent):
            try:
                with open(path, "rb") as f:
                    current: str | None = _digest(f.read())
            except FileNotFoundError:
                current = None
            if current != version:
                raise WriteConflict(_conflict_text(url, version, current is not None))
            write_bytes(url, data)
        return _digest(data)
    from fsspec.asyn import sync

    try:
        return sync(fs.loop, _s3_put_if, fs, path, data, version)
    except WriteConflict as e:
        # A PUT that succeeded but whose answer was lost is retried by botocore and then fails its own
        # condition: if the object now holds exactly our bytes, the write did happen.
        try:
            now = read_versioned(url)
        except FileNotFoundError:
            raise WriteConflict(_conflict_text(url, version, False)) from None
        if now.data == data:
            return now.version
        raise WriteConflict(_conflict_text(url, version, True)) from e


def _conflict_text(url: str, version: str | None, exists_now: bool) -> str:
    if version is None:
        return f"{url}: another writer created it first"
    if not exists_now:
        return f"{url}: it was deleted since it was read"
    return f"{url}: another writer changed it since it was read"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


async def _s3_client(fs: Any, bucket: str) -> Any:
    await fs.set_session()
    return await fs.get_s3(bucket)


async def _s3_get(fs: Any, path: str, url: str) -> tuple[bytes, str]:
    from botocore.exceptions import ClientError

    bucket, key, _ = fs.split_path(path)
    s3 = await _s3_client(fs, bucket)
    try:
        resp = await s3.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"{url}: no such file") from None
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"{url}: no such bucket; create the bucket first") from None
        raise
    body = resp["Body"]
    try:
        data = await body.read()
    finally:
        body.close()
    return data, resp["ETag"]


_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")


async def _s3_put_if(fs: Any, path: str, data: bytes, version: str | None) -> str:
    """One conditional PUT through the aiobotocore client itself (not s3fs's wrapper, which drops
    parameters botocore does not know and retries: an old botocore must fail loudly, not write
    unconditionally)."""
    from botocore.exceptions import ClientError

    bucket, key, _ = fs.split_path(path)
    s3 = await _s3_client(fs, bucket)
    members = s3.meta.service_model.operation_model("PutObject").input_shape.members
    if "IfMatch" not in members or "IfNoneMatch" not in members:
        import botocore

        raise RuntimeError(
            f"botocore {botocore.__version__} cannot send conditional PUTs (If-Match/If-None-Match); "
            "install the versions pinned in requirements/constraints.txt"
        )
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
        resp = await s3.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"s3://{bucket}/{key}: no such bucket; create the bucket first") from None
        if code in _CONFLICT_CODES or status in ("412", "409"):
            raise WriteConflict(f"s3://{bucket}/{key}: {code or status}") from None
        raise
    fs.invalidate_cache(path)
    return resp["ETag"]
