"""Local paths and s3:// URLs behind one small interface: list, stat, read ranges, upload.

The S3 endpoint comes from the standard AWS environment (credentials, region) and
S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) for S3-compatible stores. Every request retries with the
standard AWS retry mode (exponential backoff with jitter, at most 20 s between attempts) up to
`data.s3.max_attempts` attempts, each with `data.s3.timeout_s` connect/read timeouts; a download
whose stream breaks resumes from the byte it reached, with the same limits.
"""
from __future__ import annotations

import fnmatch
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Optional, Tuple

from .config import S3Config


class StorageError(ValueError):
    """A location that cannot be read or written; the message says which and what to do."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> Tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url}: not an s3://bucket/key URL")
    return bucket, key


_limits = S3Config()


def configure(limits: S3Config) -> None:
    """The retry limits of this process (the driver, and each Ray task before it touches storage)."""
    global _limits
    _limits = limits


def endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def s3_client():
    import boto3
    from botocore.config import Config
    url = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=url, config=Config(
        retries={"mode": "standard", "max_attempts": _limits.max_attempts},
        connect_timeout=_limits.timeout_s, read_timeout=_limits.timeout_s))


_UNREACHABLE = ("EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                "Could not connect to the endpoint", "Connection was closed", "timeout")


def _s3_error(e: Exception, url: str) -> StorageError:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    if any(s in f"{type(e).__name__}: {e}" for s in _UNREACHABLE):
        return StorageError(f"{url}: the S3 endpoint {endpoint()} did not answer after {_limits.max_attempts} "
                            f"attempts ({type(e).__name__}: {e}); when it is back, run the same command again (work "
                            "already done is kept), or raise data.s3.max_attempts to wait longer")
    if code in ("NoSuchBucket",):
        return StorageError(f"{url}: bucket does not exist (create it or fix the URL)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return StorageError(f"{url}: access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                            "and the bucket policy")
    if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return StorageError(f"{url}: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class FileInfo:
    url: str
    size: int
    version: str      # mtime_ns locally, ETag on S3: changes when the content may have changed


def expand(pattern: str) -> List[FileInfo]:
    """Files matching a glob (local or s3://bucket/prefix/*.jsonl), sorted. No match is an error."""
    if is_s3(pattern):
        bucket, key_pattern = split_s3(pattern)
        prefix = key_pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        client, found = s3_client(), []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if fnmatch.fnmatchcase(obj["Key"], key_pattern) and not obj["Key"].endswith("/"):
                        found.append(FileInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"')))
        except Exception as e:
            raise _s3_error(e, pattern) from None
    else:
        found = []
        for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            if os.path.isfile(p):
                if not os.access(p, os.R_OK):
                    raise StorageError(f"{p}: not readable (check its permissions)")
                st = os.stat(p)
                found.append(FileInfo(os.path.abspath(p), st.st_size, str(st.st_mtime_ns)))
    if not found:
        raise StorageError(f"data.prepare.inputs: {pattern!r} matches no files")
    return sorted(found, key=lambda f: f.url)


class _S3Raw(io.RawIOBase):
    """A GetObject body as a raw stream, so io.BufferedReader gives readline(limit). A body that breaks
    mid-stream (the connection drops) is asked for again from the byte reached, with backoff."""

    def __init__(self, url: str, start: int):
        self.url, self.pos, self.client = url, start, s3_client()
        self.body = self._get()

    def _get(self):
        bucket, key = split_s3(self.url)
        try:
            kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
            return self.client.get_object(Bucket=bucket, Key=key, **kw)["Body"]
        except Exception as e:
            raise _s3_error(e, self.url) from None

    def readable(self):
        return True

    def readinto(self, buf):
        import random
        import time
        for attempt in range(1, _limits.max_attempts + 1):
            try:
                data = self.body.read(len(buf))
                break
            except Exception as e:      # urllib3 / botocore errors of a broken stream
                if attempt == _limits.max_attempts:
                    raise _s3_error(e, self.url) from None
                time.sleep(min(20.0, random.random() * 2 ** attempt))
                self.body = self._get()
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_read(url: str, start: int = 0) -> BinaryIO:
    """A buffered binary stream positioned at byte `start`."""
    if is_s3(url):
        return io.BufferedReader(_S3Raw(url, start), buffer_size=1 << 20)
    f = open(url, "rb", buffering=1 << 20)
    f.seek(start)
    return f


def local_copy(url: str, directory: str) -> str:
    """A local path for `url` (downloaded into `directory` when it is on S3)."""
    if not is_s3(url):
        return url
    bucket, key = split_s3(url)
    dest = os.path.join(directory, bucket, key)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        s3_client().download_file(bucket, key, dest)
    except Exception as e:
        raise _s3_error(e, url) from None
    return dest


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_s3(base) else os.path.join(base, *parts)


def exists(url: str) -> bool:
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(e, url) from None
    return os.path.exists(url)


def read_text(url: str) -> Optional[str]:
    """Contents of a small text object, or None when it does not exist."""
    if not exists(url):
        return None
    with open_read(url) as f:
        return f.read().decode("utf-8")


def write_text(url: str, text: str) -> None:
    """Atomic for local files (temp + rename); a single PUT on S3."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))
        except Exception as e:
            raise _s3_error(e, url) from None
        return
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{url}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, url)


def remove(url: str) -> None:
    """Delete one file or object; nothing to do when it does not exist."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise _s3_error(e, url) from None
        return
    Path(url).unlink(missing_ok=True)


def upload_dir_files(local_dir: str, url: str, names) -> None:
    """Upload the named files of `local_dir` under the s3:// prefix `url`."""
    bucket, key = split_s3(url)
    client = s3_client()
    for name in names:
        try:
            client.upload_file(os.path.join(local_dir, name), bucket, f"{key.rstrip('/')}/{name}")
        except Exception as e:
            raise _s3_error(e, url) from None


def list_prefix(url: str) -> List[str]:
    """Keys (relative to `url`) under an s3:// prefix, or paths under a local directory."""
    if is_s3(url):
        bucket, key = split_s3(url)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        except Exception as e:
            raise _s3_error(e, url) from None
        return out
    if not os.path.isdir(url):
        return []
    return [os.path.relpath(os.path.join(r, f), url) for r, _, fs in os.walk(url) for f in fs]


def check_writable(url: str) -> None:
    """Fail before any work when the output cannot be written."""
    if is_s3(url):
        bucket, _ = split_s3(url)
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"data.prepare.output {url}: bucket {bucket!r} does not exist") from None
            raise _s3_error(e, url) from None
        return
    try:
        Path(url).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"data.prepare.output {url}: cannot create the directory ({e})") from None
    if not os.access(url, os.W_OK):
        raise StorageError(f"data.prepare.output {url}: not writable")
