"""Render unlabeled source videos (Meta-World tasks other than the target) into DIR as real video files.

    python -m components.source_videos --out data/source_videos [--preset cpu] [--set source_videos.cameras=[corner3]]
    python -m components.source_videos --out data/source_videos --external s3://videos/raw/ [--external more/]

Scripted experts with action noise play `source_videos.tasks`; every episode is filmed from each camera in
`source_videos.cameras` and encoded with PyAV as DIR/<task>-<camera>-<episode:03d>.<container>. Only frames
are kept (no actions, no rewards). Writes DIR/card.json (files and frame counts), DIR/config.json and
DIR/provenance.json (with the folder's content hash). Finished videos whose parameters did not change are kept
on a re-run.

With --external, nothing is rendered or copied: DIR/external_sources.json lists the given videos (s3:// prefixes,
files, folders) with a fingerprint of their content (S3 keys, sizes and ETags, or local file hashes), and
components.ingest reads them directly when given DIR as its source. Keys written into a URI
(s3://KEY:SECRET@bucket/prefix) are split off as the argument is parsed and used only to list the prefix here:
the record, config.json, provenance.json and every message hold the URI without them, so ingestion reads the
recorded sources with the standard AWS credentials (environment variables, profile or workload identity).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veorl.config import Params
from veorl.runtime import (
    add_component_args,
    parse_component_args,
    write_resolved_config,
)
from veorl.storage import (
    Location,
    atomic_write_json_if_changed,
    is_s3,
    read_json,
    record_content_hash,
    redact,
    s3_client,
    s3_list,
    sha256_file,
    sha256_json,
    tree_hash,
)

SECTIONS = ("source_videos",)
EXTERNAL_SOURCES = "external_sources.json"


class UnreadableSource(OSError):
    """An external source that exists as a name but cannot be listed (credentials, endpoint, permissions)."""


def run(out: str, params: Params, *, progress: bool = True) -> dict[str, Any]:
    """Render the source videos into `out`; returns the card (every file with its frame count)."""
    from veorl.envs.source_video import render_source_videos

    out_dir = Path(out)
    # A record of external sources left from an earlier run would make ingestion read those instead.
    (out_dir / EXTERNAL_SOURCES).unlink(missing_ok=True)
    result = render_source_videos(out, params.source_videos, target_task=params.collect.task, progress=progress)
    config_missing = not (out_dir / "config.json").exists() or not (out_dir / "provenance.json").exists()
    if result.changed or config_missing:
        write_resolved_config(
            out,
            params,
            SECTIONS,
            target_task=params.collect.task,
            videos_rendered=result.rendered,
            videos_kept=result.kept,
        )
    record_content_hash(out_dir)
    return result.card


def fingerprint(source: str | Location) -> list[Any]:
    """Content identity of one external source: its S3 objects with size and ETag, or local file hashes.

    Keys written into an s3:// URI are used for the listing; nothing returned or raised holds them.
    """
    location = Location.parse(source)
    uri = location.uri
    if is_s3(uri):
        try:
            listing = s3_list(uri, client=s3_client(location.credentials))
        except Exception as exc:  # botocore raises many unrelated types (credentials, endpoint, ClientError)
            raise UnreadableSource(f"{uri}: cannot list this S3 prefix: {redact(str(exc))}") from None
        if not listing:
            raise FileNotFoundError(f"{uri}: no objects under this S3 prefix")
        return [list(item) for item in listing]
    path = Path(uri)
    if path.is_dir():
        return [str(path), tree_hash(path)]
    if path.is_file():
        return [str(path), sha256_file(path)]
    raise FileNotFoundError(f"{uri}: video source does not exist")


def run_external(sources: Sequence[str | Location], out: str, params: Params) -> dict[str, Any]:
    """Record external video sources in `out` instead of rendering; returns the record (sources, fingerprint).

    Credentials written into a source URI are split off first: they serve the listing only, and the record holds
    each URI without them. The content hash is the hash of the fingerprint, so it follows the bucket's content,
    not the URIs' spelling.
    """
    if not sources:
        raise ValueError("no external video sources given")
    locations = [Location.parse(source) for source in sources]
    uris = [location.uri for location in locations]
    record = {"sources": uris, "fingerprint": {location.uri: fingerprint(location) for location in locations}}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = atomic_write_json_if_changed(out_dir / EXTERNAL_SOURCES, record)
    if changed or not (out_dir / "provenance.json").exists():
        write_resolved_config(out, params, SECTIONS, external_sources=uris)
    record_content_hash(out_dir, sha256_json(record["fingerprint"]))
    return record


def external_sources(folder: str | Path) -> list[str] | None:
    """The sources a `run_external` folder stands for, or None when `folder` is not one."""
    path = Path(folder) / EXTERNAL_SOURCES
    return list(read_json(path)["sources"]) if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.source_videos",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory for the video files, card.json and config.json")
    parser.add_argument(
        "--external",
        action="append",
        default=[],
        type=Location.parse,  # credentials in the URI are split off here, before anything can print or record them
        metavar="URI",
        help="record this s3:// prefix, file or folder of videos instead of rendering (repeatable)",
    )
    add_component_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    try:
        if args.external:
            record = run_external(args.external, args.out, params)
            print(f"recorded {len(record['sources'])} external video sources in {args.out}")
            return 0
        card = run(args.out, params, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, UnreadableSource) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(f"{card['videos']} videos ({card['frames']} frames) of {', '.join(card['tasks'])} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
