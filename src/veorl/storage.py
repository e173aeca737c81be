"""Paths that may be local or s3://, atomic writes, content hashes and provenance.

S3 access uses boto3's standard configuration: credentials and region from the AWS environment
variables or config files, and the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (so any
S3-compatible store works). Nothing here logs a credential.

Credentials written into a URI (s3://KEY:SECRET@bucket/prefix, https://user:pass@host/...) are split off where
the URI enters the program (`Location.parse`, `split_credentials`): the rest of the program sees only the URI
without them (what goes into logs, manifests, provenance and MLflow), and the `Credentials` travel separately to
the one place that opens the connection. `redact` also masks every secret split off that way, as a last resort.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it onto `final` (atomic on POSIX).

    On an exception the temporary file is removed and `final` is untouched, so a killed or failed
    writer never leaves a half-written file under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=suffix if suffix is not None else ".tmp" + final.suffix, dir=final.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; artifacts are shared with other users/containers, so use the usual mode.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_torch_save(final: str | Path, obj: Any) -> None:
    """torch.save `obj` to `final` atomically and reproducibly: the same tensors give the same bytes.

    torch.save to a path names the archive's root folder after the file, here a random temporary name, so two
    saves of equal weights would differ and change the artifact's content hash; through a file object the root
    is always "archive".
    """
    import torch

    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_json_if_changed(path: str | Path, obj: Any) -> bool:
    """Write only when the content differs, so an idempotent re-run leaves files (and their mtimes) untouched."""
    path = Path(path)
    if path.exists():
        try:
            if read_json(path) == obj:
                return False
        except (OSError, ValueError):
            pass
    atomic_write_json(path, obj)
    return True


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def tree_hash(root: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of every file under `root` (relative names and bytes), order-independent of listing."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude) or path.name.startswith("."):
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git commit of the project (with '-dirty' when the tree has changes), else the package version.

    In a container without .git, VEORL_CODE_VERSION (set at image build time) is used.
    """
    env = os.environ.get("VEORL_CODE_VERSION")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from veorl import __version__

        return f"veorl-{__version__}"


def provenance(config: dict[str, Any], upstream: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """What produced an artifact: the resolved config, upstream artifact hashes, the code version."""
    return {"config": config, "upstream": dict(upstream or {}), "code_version": code_version(), **extra}


PROVENANCE = "provenance.json"
CONTENT_HASH = "content_hash"
# Files a later step writes into an artifact's folder about the artifact (components.register's outcome lands in
# the evaluation's folder as eval/registration.json): not part of the content the producing step hashed.
ANNOTATIONS = ("registration.json",)
NOT_CONTENT = (PROVENANCE, *ANNOTATIONS)


def recorded_content_hash(path: str | Path) -> str | None:
    """The content hash recorded in `path`/provenance.json by the step that wrote the artifact, or None."""
    prov_path = Path(path) / PROVENANCE
    if not prov_path.is_file():
        return None
    try:
        prov = read_json(prov_path)
    except (OSError, ValueError):
        return None
    recorded = prov.get(CONTENT_HASH) if isinstance(prov, dict) else None
    return recorded if isinstance(recorded, str) and recorded else None


def record_content_hash(out_dir: str | Path, value: str | None = None) -> str:
    """Record an artifact's content hash in its provenance.json, once, when the step that writes it is done.

    `value` defaults to the tree hash of every file but provenance.json; formats with a cheaper exact
    hash (a manifest or card that lists every file) pass their own. Readers use `artifact_hash`.
    An unchanged hash is not rewritten, so an idempotent re-run of a step leaves the artifact's files untouched.
    Call it last, once every other file of the artifact is in place (`write_resolved_config` rewrites
    provenance.json without a hash, so write the resolved config first).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no artifact folder to record a content hash in")
    value = value or tree_hash(out_dir, exclude=NOT_CONTENT)
    prov_path = out_dir / PROVENANCE
    prov = read_json(prov_path) if prov_path.is_file() else {}
    atomic_write_json_if_changed(prov_path, {**prov, CONTENT_HASH: value})
    return value


def artifact_hash(path: str | Path) -> str:
    """The content hash the producing step recorded in `path`/provenance.json; for an artifact made elsewhere
    (no recorded hash), the tree hash of its files but provenance.json, computed here."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not an artifact folder")
    return recorded_content_hash(path) or tree_hash(path, exclude=NOT_CONTENT)


def content_hash_problem(path: str | Path) -> str | None:
    """Why the files of artifact `path` are not the ones its producing step hashed, or None when they are.

    For artifacts whose recorded hash is the tree hash of their files (the default of record_content_hash, e.g.
    an evaluation): no recorded hash, or one that a fresh hash of the files no longer matches, is a problem.
    """
    path = Path(path)
    recorded = recorded_content_hash(path)
    if recorded is None:
        return f"{path / PROVENANCE} records no content hash, so the files cannot be checked"
    fresh = tree_hash(path, exclude=NOT_CONTENT)
    if fresh != recorded:
        return (
            f"the files of {path} changed after they were hashed (content hash {fresh[:12]}..., "
            f"recorded {recorded[:12]}...)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Credentials in URIs
# ----------------------------------------------------------------------------------------------

_KNOWN_SECRETS: set[str] = set()


@dataclass(frozen=True)
class Credentials:
    """A user name (an S3 access key id) and password (secret key) split off a URI; never shown by repr."""

    username: str = field(repr=False)
    password: str = field(repr=False, default="")

    def __post_init__(self) -> None:
        for value in (self.username, self.password):
            if len(value) >= 4:
                _KNOWN_SECRETS.add(value)

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    def __reduce__(self):  # unpickled in a worker process: register the secrets for redaction there too
        return (Credentials, (self.username, self.password))


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)(.*)$", re.DOTALL)


def split_credentials(uri: str) -> tuple[str, Credentials | None]:
    """(the URI without its user-info part, the credentials it held or None).

    `scheme://user:password@host/...` and `scheme://token@host/...`; percent-escapes in either part are decoded.
    A password holding an unescaped '/' (common in AWS secret keys) is still recognised: the user part before ':'
    never holds one. A '@' further along a path (s3://bucket/a@b.mp4) is not user info.
    """
    from urllib.parse import unquote

    match = _SCHEME.match(str(uri))
    if not match:
        return str(uri), None
    scheme, rest = match.groups()
    userinfo, at, remainder = rest.partition("@")
    if not at or not userinfo:
        return str(uri), None
    user, colon, password = userinfo.partition(":")
    if "/" in userinfo and ("/" in user or not colon):
        return str(uri), None
    return scheme + remainder, Credentials(unquote(user), unquote(password))


@dataclass(frozen=True)
class Location:
    """A URI or path as the program uses it: `uri` without credentials, `credentials` only for connecting."""

    uri: str
    credentials: Credentials | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        if isinstance(value, Location):
            return value
        uri, credentials = split_credentials(os.fspath(value))
        return cls(uri, credentials)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        return self.uri


# ----------------------------------------------------------------------------------------------
# Local or S3 locations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return cls(bucket, key)

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith("s3://")


def s3_client(credentials: Credentials | None = None):
    """A boto3 S3 client configured from the standard AWS environment/config, or with `credentials` (split off an
    s3://KEY:SECRET@bucket URI) in place of the environment's keys.

    boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself (botocore >= 1.31); MLFLOW_S3_ENDPOINT_URL is
    honoured too so one endpoint variable serves MLflow and ingestion.
    """
    import boto3

    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    )
    keys = {}
    if credentials is not None:
        # Keys given with the URI replace the environment's, session token included (it belongs to other keys).
        keys = {
            "aws_access_key_id": credentials.username,
            "aws_secret_access_key": credentials.password,
            "aws_session_token": None,
        }
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, **keys)


def s3_list(uri: str, client=None) -> list[tuple[str, int, str]]:
    """(uri, size, etag) of every object under an s3:// prefix, sorted by key."""
    loc = S3Location.parse(uri)
    client = client or s3_client()
    out: list[tuple[str, int, str]] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue
            out.append((f"s3://{loc.bucket}/{obj['Key']}", int(obj["Size"]), obj.get("ETag", "").strip('"')))
    return sorted(out)


def s3_download(uri: str, dest: str | Path, client=None) -> Path:
    """Download one object atomically to `dest`."""
    loc = S3Location.parse(uri)
    client = client or s3_client()
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        client.download_file(loc.bucket, loc.key, str(tmp))
    return dest


def s3_upload(src: str | Path, uri: str, client=None) -> None:
    loc = S3Location.parse(uri)
    (client or s3_client()).upload_file(str(src), loc.bucket, loc.key)


def redact(text: str) -> str:
    """Remove any credential value present in the environment, or split off a URI, from a message."""
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    for var in (
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "KFP_TOKEN",
    ):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{var}>")
    # user:password@ inside URLs (e.g. an MLflow tracking URI with basic auth)
    return _URL_USERINFO.sub(r"\1<redacted>@", text)


_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")
