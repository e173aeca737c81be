"""Source video rendering (components.source_videos): real Meta-World episodes encoded with PyAV, frames only."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from components import source_videos
from veorl.config import ConfigError
from veorl.envs.source_video import render_source_videos

pytestmark = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="metaworld not installed")

# Smoke preset: door-open and button-press-topdown, one episode each; two cameras to cover multi-camera filming.
OVERRIDES = [
    "source_videos.cameras=[corner2, corner3]",
    "source_videos.episode_length=20",
    "source_videos.render_size=48",
]


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "videos"
    argv = ["--out", str(out), "--preset", "smoke", "--params", str(out.parent / "absent.yaml"), "--no-progress"]
    for item in OVERRIDES:
        argv += ["--set", item]
    assert source_videos.main(argv) == 0
    return out


def test_writes_decodable_videos_of_the_right_size_and_length(rendered):
    videos = sorted(rendered.glob("*.mp4"))
    names = [v.name for v in videos]
    assert names == [
        f"{task}-{cam}-000.mp4" for task in ("button-press-topdown", "door-open") for cam in ("corner2", "corner3")
    ]
    for video in videos:
        frames = decode(video)
        assert frames.shape == (20, 48, 48, 3), video.name
        assert frames.std() > 10, f"{video.name} looks blank"
        assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 0.5, f"{video.name} does not move"
    # Two cameras film the same episode from different places.
    a, b = decode(rendered / "door-open-corner2-000.mp4"), decode(rendered / "door-open-corner3-000.mp4")
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_only_frames_from_non_target_tasks(rendered):
    card = json.loads((rendered / "card.json").read_text())
    assert card["target_task"] == "drawer-open"
    assert "drawer-open" not in card["tasks"]
    assert all(not f.startswith("drawer-open") for f in (p.name for p in rendered.iterdir()))
    assert card["labels"].startswith("none")
    # No actions or rewards anywhere in the stage's output.
    assert not list(rendered.rglob("*.npz")) and not list(rendered.rglob("*.npy"))


def test_card_lists_every_file_with_its_frame_count(rendered):
    card = json.loads((rendered / "card.json").read_text())
    listed = {f["file"]: f["frames"] for f in card["files"]}
    on_disk = {p.name: len(decode(p)) for p in rendered.glob("*.mp4")}
    assert listed == on_disk
    assert card["videos"] == 4 and card["frames"] == 80
    assert all(re.fullmatch(r"[a-z-]+-corner[23]-\d{3}\.mp4", name) for name in listed)
    config = json.loads((rendered / "config.json").read_text())
    assert config["source_videos"]["render_size"] == 48 and config["preset"] == "smoke"
    assert json.loads((rendered / "provenance.json").read_text())["config"] == config


def test_rerun_keeps_complete_files_and_writes_nothing(rendered, params):
    before = mtimes(rendered)
    card = source_videos.run(str(rendered), params(*OVERRIDES), progress=False)
    assert card == json.loads((rendered / "card.json").read_text())
    assert mtimes(rendered) == before


def test_fewer_tasks_remove_only_this_stages_stale_videos(rendered, tmp_path, params):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(rendered, out)
    (out / "users-own-video.mp4").write_bytes(b"not ours")
    cfg = params(*OVERRIDES, "source_videos.tasks=[door-open]").source_videos
    result = render_source_videos(out, cfg, target_task="drawer-open", progress=False)
    assert result.rendered == [] and result.kept == ["door-open-000"]
    assert sorted(p.name for p in out.glob("*.mp4")) == [
        "door-open-corner2-000.mp4",
        "door-open-corner3-000.mp4",
        "users-own-video.mp4",
    ]
    assert [f["file"] for f in result.card["files"]] == ["door-open-corner2-000.mp4", "door-open-corner3-000.mp4"]


def test_target_task_among_sources_is_refused(tmp_path, params):
    with pytest.raises(ConfigError, match="target task"):
        params("source_videos.tasks=[drawer-open, door-open]")
    cfg = params().source_videos.model_copy(update={"tasks": ["drawer-open"]})
    with pytest.raises(ValueError, match="target task 'drawer-open'"):
        render_source_videos(tmp_path, cfg, target_task="drawer-open", progress=False)


def test_help_runs_as_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "components.source_videos", "--help"], capture_output=True, text=True, check=True
    )
    assert "--out" in out.stdout and "--set" in out.stdout
