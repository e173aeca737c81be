"""Ingest raw video into fixed-size clips: `python -m components.ingest --source SRC [--source SRC ...] --out DIR`.

Sources are video files, folders (walked recursively; a folder of jpg/png frames is one trajectory), globs
and s3://bucket/prefix URIs (endpoint and credentials from the standard AWS environment/config, or keys given as
s3://KEY:SECRET@bucket/prefix: they are split off as the argument is parsed and used only to connect). A folder
written by `components.source_videos --external` stands for the sources it records. Settings come from the
`ingest` section of params.yaml (size, fps, window, stride, clips_per_shard, workers, ...), overridable with
--set ingest.KEY=VALUE. Re-running skips what is already ingested with the same settings.

Exit status: 0 when at least one source was ingested (failed ones are listed), 1 when none could be,
2 for invalid parameters.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from components.source_videos import external_sources
from veorl.config import Params
from veorl.data.clips import clips_hash
from veorl.runtime import add_component_args, parse_component_args
from veorl.storage import Location, record_content_hash


class IngestFailed(RuntimeError):
    """No source could be ingested; the manifest (written anyway) lists each source's reason."""


def expand_recorded_sources(sources: Sequence[str | Location]) -> list[Location]:
    """Each source (credentials split off), with a folder of recorded external sources replaced by its sources."""
    out: list[Location] = []
    for source in map(Location.parse, sources):
        recorded = None if "://" in source.uri else external_sources(source.uri)
        out.extend(map(Location.parse, recorded) if recorded is not None else [source])
    return out


def run(sources: Sequence[str | Location], out: str, params: Params, *, progress: bool = True) -> dict:
    """Ingest `sources` into `out` and print a summary; returns the manifest (also written to OUT/manifest.json).

    Raises IngestFailed when no source could be ingested. On success the clips' content hash (the manifest's,
    as veorl.data.clips.clips_hash computes it) is recorded in OUT/provenance.json.
    """
    from veorl.video.ingest import exit_reason, ingest, summarize

    manifest = ingest(expand_recorded_sources(sources), out, params, progress=progress)
    print(summarize(manifest, out), flush=True)
    reason = exit_reason(manifest)
    if reason:
        raise IngestFailed(f"{reason}; see the reasons above and {out}/manifest.json")
    record_content_hash(out, clips_hash(out, recorded=False))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes OUT/manifest.json, OUT/clips/<key>-<k>.npy (uint8 N x window x size x size x 3), "
        "OUT/config.json and OUT/provenance.json.",
    )
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        type=Location.parse,  # credentials in the URI are split off here, before anything can print or record them
        metavar="SRC",
        help="video file, folder, glob (quote it) or s3://bucket/prefix; repeatable",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; re-runs resume in it)")
    add_component_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    try:
        run(args.source, args.out, params, progress=not args.no_progress)
    except IngestFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
