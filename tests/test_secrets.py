"""Secrets never reach logs, manifests, provenance, MLflow params/tags or error messages.

Distinctive secrets are planted everywhere a credential can come in: in the source URL
(s3://KEY:SECRET@bucket/...), in the AWS and MLflow environment variables, and in the tracking URI of the
parameters (https://user:pass@host). The smoke pipeline then runs as the components' CLIs would run it, against a
local S3 server (moto) and a sqlite MLflow store: ingest from the bucket, pretrain, finetune, evaluate, register.
Afterwards every byte the run produced (stdout/stderr of each step, every file it wrote, every table of the MLflow
store as text) is swept for the secrets.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import moving_square_video, write_episodes

REPO = Path(__file__).resolve().parents[1]

SOURCE_KEY_ID = "AKIASOURCEURLKEY7781"
SOURCE_SECRET = "src-Url/Secret+Planted-5521"  # an unescaped '/', as AWS secret keys often have
ENV_SECRET = "env-aws-secret-planted-6632"
ENV_SESSION_TOKEN = "env-aws-session-token-planted-7743"
ENV_MLFLOW_PASSWORD = "env-mlflow-password-planted-8854"
URI_TRACKING_PASSWORD = "uri-tracking-password-planted-9965"
SECRETS = (SOURCE_KEY_ID, SOURCE_SECRET, ENV_SECRET, ENV_SESSION_TOKEN, ENV_MLFLOW_PASSWORD, URI_TRACKING_PASSWORD)


def _leaks(data: bytes) -> list[str]:
    # Also the percent-escaped and JSON-escaped forms, in case a writer re-encodes the value.
    found = []
    for secret in SECRETS:
        forms = {secret, secret.replace("/", "%2F"), secret.replace("/", "\\/")}
        if any(form.encode() in data for form in forms):
            found.append(secret)
    return found


def _sqlite_dump(db: Path) -> bytes:
    """Every row of every table of the MLflow store, as text."""
    with sqlite3.connect(db) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"runs", "params", "tags", "model_versions", "model_version_tags"} <= set(tables)
        text = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                text.append(f"{table}: {row!r}")
    return "\n".join(text).encode()


def test_planted_secrets_reach_no_output_file_or_store(s3_bucket, tmp_path, monkeypatch):
    from veorl.storage import s3_client
    from veorl.video.encode import write_video

    # Source videos in the bucket, reached with the keys in the URL (moto accepts any keys).
    client = s3_client()
    for index in range(2):
        local = tmp_path / f"video-{index}.mp4"
        write_video(local, moving_square_video(30, seed=index), fps=10)
        client.upload_file(str(local), s3_bucket, f"videos/video-{index}.mp4")
        local.unlink()
    source = f"s3://{SOURCE_KEY_ID}:{SOURCE_SECRET}@{s3_bucket}/videos"

    work = tmp_path / "work"
    work.mkdir()
    db = work / "mlruns.db"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        MLFLOW_DISABLE_TELEMETRY="true",
        AWS_SECRET_ACCESS_KEY=ENV_SECRET,
        AWS_SESSION_TOKEN=ENV_SESSION_TOKEN,
        MLFLOW_TRACKING_USERNAME="veorl-user",
        MLFLOW_TRACKING_PASSWORD=ENV_MLFLOW_PASSWORD,
        OMP_NUM_THREADS="1",
    )
    env.pop("VEORL_PARENT_RUN_ID", None)
    common = ["--preset", "smoke", "--set", f"tracking.uri=https://alice:{URI_TRACKING_PASSWORD}@mlflow.example.com"]
    outputs: list[bytes] = []

    def step(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", *args, *common], cwd=work, env=env, capture_output=True, timeout=300
        )
        outputs.append(proc.stdout + proc.stderr)
        return proc

    write_episodes(work / "data" / "target_episodes", episodes=2, length=16)
    ingest = step("components.ingest", "--source", source, "--out", "data/video_clips", "--no-progress")
    assert ingest.returncode == 0, ingest.stderr.decode()[-3000:]
    manifest = (work / "data" / "video_clips" / "manifest.json").read_text()
    assert f'"uri": "s3://{s3_bucket}/videos/video-0.mp4"' in manifest  # the redacted form, ingested
    assert '"ok": 2' in manifest

    stages = [
        ("components.pretrain", "--clips", "data/video_clips", "--episodes", "data/target_episodes",
         "--out", "models/video_world_model", "--metrics", "metrics/pretrain.json",
         "--curve", "metrics/pretrain_curve.csv", "--no-progress"),
        ("components.finetune", "--world-model", "models/video_world_model", "--episodes", "data/target_episodes",
         "--clips", "data/video_clips", "--out", "models/agent", "--metrics", "metrics/finetune.json",
         "--curve", "metrics/finetune_curve.csv", "--no-progress"),
        ("components.evaluate", "--agent", "models/agent", "--out", "eval", "--no-progress",
         "--set", "evaluate.videos=0"),
        ("components.register", "--agent", "models/agent", "--evaluation", "eval", "--out", "eval/registration.json"),
    ]  # fmt: skip
    for args in stages:
        proc = step(*args)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr.decode()[-3000:]}"
    assert (work / "eval" / "registration.json").is_file()

    # A source that cannot be listed: the error message is recorded, and holds no secret either.
    failed = step("components.ingest", "--source", source.replace(s3_bucket, "no-such-bucket-x"), "--out", "bad")
    assert failed.returncode == 1 and b"no-such-bucket-x" in failed.stdout + failed.stderr

    swept = 0
    for index, output in enumerate(outputs):
        assert not _leaks(output), f"step {index} printed {_leaks(output)}"
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        data = _sqlite_dump(path) if path == db else path.read_bytes()
        assert not _leaks(data), f"{path.relative_to(work)} holds {_leaks(data)}"
        swept += 1
    assert swept > 20 and (work / "mlartifacts").is_dir()
    # The sweep can see a secret: the same dump of the store finds one once it is written there.
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO experiment_tags VALUES (?, ?, ?)", ("probe", ENV_SECRET, "0"))
    assert _leaks(_sqlite_dump(db)) == [ENV_SECRET]


@pytest.mark.parametrize(
    "argument, uri",
    [
        ("s3://KEYID123:se/cr+et@bucket/videos", "s3://bucket/videos"),
        ("https://user:pa%40ss@host.example/x.mp4", "https://host.example/x.mp4"),
        ("s3://bucket/a:b@c.mp4", "s3://bucket/a:b@c.mp4"),  # an '@' in a key is not user info
    ],
)
def test_credentials_are_split_off_where_a_source_argument_is_parsed(argument, uri):
    from components.ingest import build_parser

    args = build_parser().parse_args(["--source", argument, "--out", "x"])
    (location,) = args.source
    assert str(location) == uri and os.fspath(location) == uri
    assert "se/cr+et" not in repr(location) and "pa@ss" not in repr(location)
    if uri != argument:
        assert location.credentials is not None and "KEYID123" not in repr(location.credentials)


def test_credentials_in_external_video_sources_are_used_to_list_but_never_recorded(s3_bucket, tmp_path, capsys, params):
    """`components.source_videos --external s3://KEY:SECRET@bucket/prefix`: the keys list the prefix, the record
    (and config, provenance, messages) holds the URI without them, and ingestion reads the recorded sources with the
    environment's credentials. Every file written and every line printed is swept for the keys."""
    from components import ingest, source_videos
    from veorl.storage import s3_client
    from veorl.video.encode import write_video

    client = s3_client()
    for index in range(2):
        local = tmp_path / f"video-{index}.mp4"
        write_video(local, moving_square_video(30, seed=index), fps=10)
        client.upload_file(str(local), s3_bucket, f"raw/video-{index}.mp4")
        local.unlink()
    work = tmp_path / "work"
    videos = work / "data" / "source_videos"
    common = ["--out", str(videos), "--preset", "smoke", "--params", str(tmp_path / "absent.yaml")]
    prefix, one = f"{s3_bucket}/raw/", f"{s3_bucket}/raw/video-1.mp4"

    planted = [f"s3://{SOURCE_KEY_ID}:{SOURCE_SECRET}@{prefix}", f"s3://{SOURCE_KEY_ID}:{SOURCE_SECRET}@{one}"]
    assert source_videos.main([*common, "--external", planted[0], "--external", planted[1]]) == 0
    record = json.loads((videos / source_videos.EXTERNAL_SOURCES).read_text())
    assert record["sources"] == [f"s3://{prefix}", f"s3://{one}"]
    assert [item[0] for item in record["fingerprint"][f"s3://{prefix}"]] == [
        f"s3://{s3_bucket}/raw/video-0.mp4",
        f"s3://{s3_bucket}/raw/video-1.mp4",
    ]
    config = json.loads((videos / "provenance.json").read_text())
    assert config["external_sources"] == record["sources"]

    # Refused sources: an https URL with user:password (not a source ingestion reads) and a bucket that cannot be
    # listed; their messages name the URI without the keys.
    refused = work / "refused"
    argv = ["--out", str(refused), "--preset", "smoke", "--params", str(tmp_path / "absent.yaml")]
    https = f"https://{SOURCE_KEY_ID}:{SOURCE_SECRET}@videos.example.com/x.mp4"
    assert source_videos.main([*argv, "--external", https]) == 2
    missing = f"s3://{SOURCE_KEY_ID}:{SOURCE_SECRET}@no-such-bucket-x/raw/"
    assert source_videos.main([*argv, "--external", missing]) == 2
    printed = capsys.readouterr()
    assert "https://videos.example.com/x.mp4" in printed.err and "s3://no-such-bucket-x/raw/" in printed.err

    # Ingestion of the folder reads the recorded sources with the environment's keys (s3_env's), as --source would.
    manifest = ingest.run([str(videos)], str(work / "data" / "video_clips"), params(), progress=False)
    assert [(e["uri"], e["status"]) for e in manifest["sources"]] == [
        (f"s3://{s3_bucket}/raw/video-{index}.mp4", "ok") for index in range(2)
    ]

    printed = capsys.readouterr()
    assert not _leaks((printed.out + printed.err).encode()), _leaks((printed.out + printed.err).encode())
    swept = 0
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        assert not _leaks(path.read_bytes()), f"{path.relative_to(work)} holds {_leaks(path.read_bytes())}"
        swept += 1
    assert swept >= 6 and (videos / "config.json").is_file()
