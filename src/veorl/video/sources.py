"""What to ingest: expanding --source arguments into trajectories, fetching them, hashing their content.

A source argument may be a file, a folder, a glob, or an s3://bucket/prefix URI. It expands into
trajectories of two kinds (credentials in an s3://KEY:SECRET@bucket/prefix argument are split off on entry,
see veorl.storage.Location: a Source's `uri` never holds them, its `credentials` are used only to connect):
  video           one video file (any container/codec FFmpeg decodes);
  image_sequence  one folder (or S3 "folder") of jpg/png frames, in natural order (frame_2 before frame_10),
                  the way BridgeData ships its trajectories.
Folders are walked recursively: every video file is a trajectory, and every folder holding image files is
one trajectory, so a folder of per-trajectory subfolders gives one trajectory per subfolder. Other files
(notes, metadata) are ignored. A file named explicitly is always tried as a video, whatever its extension.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import posixpath
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from veorl.storage import (
    Credentials,
    Location,
    S3Location,
    is_s3,
    redact,
    s3_client,
    s3_download,
    s3_list,
    sha256_file,
)
from veorl.video.decode import natural_key

VIDEO = "video"
IMAGE_SEQUENCE = "image_sequence"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One trajectory to ingest. `members` are local paths or s3:// URIs (one for a video, one per frame)."""

    uri: str
    kind: str
    members: tuple[str, ...]
    # Cheap change detector (sizes and mtimes, or S3 ETags): an unchanged fingerprint lets a re-run trust the
    # content hash recorded last time instead of reading (or downloading) the bytes again.
    fingerprint: str | None = None
    # Set when the argument resolved to nothing usable; the source is then recorded as failed with this reason.
    problem: str | None = None
    # Keys that came with the source argument (s3://KEY:SECRET@bucket/...): for the connection only, never shown.
    credentials: Credentials | None = field(default=None, repr=False, compare=False)


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _local_fingerprint(paths: Sequence[str]) -> str:
    parts = []
    for path in paths:
        st = os.stat(path)
        parts.append(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}")
    return _fingerprint(parts)


def _local_video(path: str) -> Source:
    return Source(uri=path, kind=VIDEO, members=(path,), fingerprint=_local_fingerprint([path]))


def _walk_folder(root: str, video_ext: set[str], image_ext: set[str], exclude: set[str]) -> list[Source]:
    found: list[Source] = []
    for folder, dirs, files in os.walk(root):
        # Hidden folders (.cache, .git, .dvc) and the output folder itself are never sources.
        dirs[:] = sorted(
            (d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) not in exclude),
            key=natural_key,
        )
        names = sorted((f for f in files if not f.startswith(".")), key=natural_key)
        for name in names:
            if _extension(name) in video_ext:
                found.append(_local_video(os.path.join(folder, name)))
        frames = [os.path.join(folder, n) for n in names if _extension(n) in image_ext]
        if frames:
            found.append(
                Source(
                    uri=os.path.normpath(folder),
                    kind=IMAGE_SEQUENCE,
                    members=tuple(frames),
                    fingerprint=_local_fingerprint(frames),
                )
            )
    return found


def _expand_local(spec: str, video_ext: set[str], image_ext: set[str], exclude: set[str]) -> list[Source]:
    spec = os.path.normpath(os.path.expanduser(spec))
    if os.path.isfile(spec):
        return [_local_video(spec)]
    if os.path.isdir(spec):
        found = _walk_folder(spec, video_ext, image_ext, exclude)
        if not found:
            return [
                Source(
                    uri=spec,
                    kind=VIDEO,
                    members=(),
                    problem=(
                        f"no video files ({', '.join(sorted(video_ext))}) or image folders "
                        f"({', '.join(sorted(image_ext))}) under this folder"
                    ),
                )
            ]
        return found
    if _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(spec, recursive=True), key=natural_key)
        found = []
        frames_by_folder: dict[str, list[str]] = {}
        for match in matches:
            if os.path.isdir(match):
                found.extend(_walk_folder(match, video_ext, image_ext, exclude))
            elif _extension(match) in video_ext:
                found.append(_local_video(match))
            elif _extension(match) in image_ext:  # traj0/*.png: the matched frames of each folder form one sequence
                frames_by_folder.setdefault(os.path.dirname(match), []).append(match)
        for folder, frames in frames_by_folder.items():
            found.append(
                Source(
                    uri=os.path.normpath(folder),
                    kind=IMAGE_SEQUENCE,
                    members=tuple(frames),
                    fingerprint=_local_fingerprint(frames),
                )
            )
        if not found:
            return [Source(uri=spec, kind=VIDEO, members=(), problem="the glob matches no video file or image folder")]
        return found
    return [Source(uri=spec, kind=VIDEO, members=(), problem="not found: no such file, folder or glob match")]


def _expand_s3(
    spec: str, video_ext: set[str], image_ext: set[str], credentials: Credentials | None = None
) -> list[Source]:
    found = _expand_s3_objects(spec, video_ext, image_ext, credentials)
    return [replace(source, credentials=credentials) for source in found]


def _expand_s3_objects(
    spec: str, video_ext: set[str], image_ext: set[str], credentials: Credentials | None
) -> list[Source]:
    try:
        location = S3Location.parse(spec)
        objects = s3_list(spec, client=_cached_s3_client(credentials))
    except Exception as exc:  # botocore raises many unrelated types (credentials, endpoint, ClientError)
        return [Source(uri=spec, kind=VIDEO, members=(), problem=f"cannot list S3 prefix: {redact(str(exc))}")]
    exact = [o for o in objects if S3Location.parse(o[0]).key == location.key]
    if exact:
        uri, size, etag = exact[0]
        return [Source(uri=uri, kind=VIDEO, members=(uri,), fingerprint=_fingerprint([f"{etag}:{size}"]))]
    if location.key and not location.key.endswith("/"):
        # s3://bucket/videos means the "folder" videos/, not also videos2/.
        folder_prefix = f"s3://{location.bucket}/{location.key}/"
        objects = [o for o in objects if o[0].startswith(folder_prefix)]
    objects.sort(key=lambda o: natural_key(o[0]))
    found: list[Source] = []
    groups: dict[str, list[tuple[str, int, str]]] = {}
    for uri, size, etag in objects:
        name = posixpath.basename(uri)
        if name.startswith("."):
            continue
        if _extension(name) in video_ext:
            found.append(Source(uri=uri, kind=VIDEO, members=(uri,), fingerprint=_fingerprint([f"{etag}:{size}"])))
        elif _extension(name) in image_ext:
            groups.setdefault(posixpath.dirname(uri), []).append((uri, size, etag))
    for folder, frames in groups.items():
        found.append(
            Source(
                uri=folder,
                kind=IMAGE_SEQUENCE,
                members=tuple(u for u, _, _ in frames),
                fingerprint=_fingerprint([f"{posixpath.basename(u)}:{e}:{s}" for u, s, e in frames]),
            )
        )
    if not found:
        return [
            Source(uri=spec, kind=VIDEO, members=(), problem="no video files or image folders under this S3 prefix")
        ]
    return found


def expand_sources(
    specs: Sequence[str | Location],
    video_extensions: Sequence[str],
    image_extensions: Sequence[str],
    exclude: Sequence[str | Path] = (),
) -> list[Source]:
    """Trajectories named by the --source arguments, in argument order then natural order, without repeats.

    Each argument is split into its URI and credentials first (veorl.storage.Location.parse), so nothing below
    sees a credential written into an argument.
    """
    video_ext, image_ext = {e.lower() for e in video_extensions}, {e.lower() for e in image_extensions}
    excluded = {os.path.realpath(p) for p in exclude}
    seen: set[str] = set()
    out: list[Source] = []
    for argument in specs:
        location = Location.parse(argument)
        spec = location.uri
        expanded = (
            _expand_s3(spec, video_ext, image_ext, location.credentials)
            if is_s3(spec)
            else _expand_local(spec, video_ext, image_ext, excluded)
        )
        for source in expanded:
            if source.uri not in seen:
                seen.add(source.uri)
                out.append(source)
    return out


_clients: dict[tuple, object] = {}


def _cached_s3_client(credentials: Credentials | None = None):
    """One client per process and configuration: creating a boto3 session costs ~0.1 s, a lot per small object."""
    key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_PROFILE"),
        credentials,
    )
    if key not in _clients:
        _clients[key] = s3_client(credentials)
    return _clients[key]


@contextlib.contextmanager
def fetched(source: Source, cache_dir: str | Path) -> Iterator[list[Path]]:
    """Local paths of the source's members; S3 objects are downloaded under `cache_dir` and deleted afterwards."""
    if not any(is_s3(m) for m in source.members):
        yield [Path(m) for m in source.members]
        return
    folder = Path(cache_dir) / hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        client = _cached_s3_client(source.credentials)
        paths = []
        for index, member in enumerate(source.members):
            # Keep the extension: FFmpeg's probing uses it as a hint for formats without a clear signature.
            local = folder / f"{index:06d}{_extension(member)}"
            s3_download(member, local, client=client)
            paths.append(local)
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def content_hash(source: Source, paths: Sequence[Path]) -> str:
    """sha256 of a video's bytes; for an image sequence, of its frame names and their bytes, in order."""
    if source.kind == VIDEO:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for member, path in zip(source.members, paths):
        digest.update(f"{posixpath.basename(member)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()
