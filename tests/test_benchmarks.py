"""The benchmark scripts run and report what they claim to (sizes shrunk; timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_deconv_reports_every_form_and_the_decoders_choice(tmp_path):
    out = tmp_path / "deconv.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_deconv.py"),
            "--depth",
            "4",
            "--frames",
            "3",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "| bf16 | 16->8 k5 5x5->13x13 |" in done.stdout
    report = json.loads(out.read_text())
    assert report["depth"] == 4 and report["frames"] == 3
    uses = {(r["precision"], r["layer"]): r["decoder_uses"] for r in report["layers"]}
    assert uses == {
        ("fp32", "16->8 k5 5x5->13x13"): "native",
        ("fp32", "8->4 k6 13x13->30x30"): "native",
        ("fp32", "4->3 k6 30x30->64x64"): "subpixel",
        ("bf16", "16->8 k5 5x5->13x13"): "subpixel",
        ("bf16", "8->4 k6 13x13->30x30"): "native",
        ("bf16", "4->3 k6 30x30->64x64"): "subpixel",
    }
    for r in report["layers"]:
        for form in ("native", "subpixel"):
            assert 0 < r[form]["forward_s"] and 0 < r[form]["forward_backward_s"]
        assert r["pytorch"]["forward_backward_s"] > 0
        assert r["backward_bias_in_call_s"] > 0 and r["backward_bias_apart_s"] > 0
        chosen = r[r["decoder_uses"]]["forward_backward_s"]
        assert r["speedup_over_pytorch"] == r["pytorch"]["forward_backward_s"] / chosen
    assert [d["precision"] for d in report["decoder"]] == ["fp32", "bf16"]
    assert all(d["pytorch_s"] > 0 and d["decoder_choice_s"] > 0 for d in report["decoder"])


def test_bench_memory_runs_every_mode_in_its_own_process(tmp_path):
    import platform

    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--preset", "smoke", "--updates", "3"]
    cmd += ["--skip", "1", "--threads", "1", "--variant", "phase2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["system", "retained-unbounded", "retained"]
    glibc = platform.libc_ver()[0] == "glibc"
    for r in report["results"]:
        assert r["retained"] is (glibc and r["mode"] != "system")
        assert len(r["seconds"]) == len(r["resident_gb"]) == 3 and min(r["seconds"]) > 0
        assert r["peak_resident_gb"] >= max(r["resident_gb"]) * 0.99
    assert (
        "| retained |" in done.stdout
        and "RSS GB after 3" in done.stdout
        and "fastest / median / slowest" in done.stdout
    )


def test_bench_world_model_warms_up_until_the_heap_settles(tmp_path):
    import platform

    out = tmp_path / "world_model.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_world_model.py"), "--preset", "smoke", "--threads", "1"]
    cmd += ["--variants", "phase1", "phase3", "phase3-uncached", "--repeats", "2", "--warmup", "1", "--settle", "3"]
    cmd += ["--gemm", "128", "--conv-batch", "4", "--peak-seconds", "0.1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report] == ["phase1", "phase3", "phase3-uncached"]
    # phase 3 reads its start embeddings from the table built before the timed updates: no encoder FLOPs per update
    cached, uncached = report[1], report[2]
    assert cached["embedding_cache"]["frames"] > 0 and cached["embedding_cache"]["build_s"] > 0
    assert "embedding_cache" not in uncached
    assert cached["flops_per_update"] < uncached["flops_per_update"]
    assert "target frames cached once" in done.stdout
    glibc = platform.libc_ver()[0] == "glibc"
    for r in report:
        assert r["device"] == "cpu" and "peak_gpu_memory_gb" not in r
        assert r["retain_memory"] is glibc and r["repeats"] == 2
        # at least --warmup untimed updates, at most --settle more, and only while memory is retained
        assert 1 <= r["warmup_updates"] <= (4 if glibc else 1)
        assert r["minor_faults_per_update"] >= 0 and r["seconds"]["update"] > 0
        assert 0 < r["fraction_of_gemm_peak"] and 0 < r["fraction_of_conv_peak"]
        assert r["flops_per_update"] > 0
        # the limits are measured before and after the variants, and the higher of the two counts
        peaks = r["peaks"]
        assert len(peaks["measurements"]) == 2
        for key in ("gemm_fp32", "gemm_bf16", "conv_fp32", "conv_bf16"):
            assert peaks[key] == max(m[key] for m in peaks["measurements"]) > 0
    assert f"{report[0]['warmup_updates']} warm-up" in done.stdout
    assert "the higher of 2 measurements" in done.stdout


def test_bench_world_model_names_the_device_it_cannot_use():
    """--device cuda without a CUDA device (or an unknown device) stops at once with the reason, before any work."""
    import torch

    script = str(ROOT / "benchmarks" / "bench_world_model.py")
    devices = ["tpu"] if torch.cuda.is_available() else ["cuda", "tpu"]
    for device in devices:
        done = subprocess.run(
            [sys.executable, script, "--preset", "smoke", "--device", device],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert f"--device {device}:" in done.stderr
        assert "peak, before" not in done.stderr  # nothing was measured


def test_bench_release_refuses_a_folder_that_is_not_the_release(tmp_path):
    """Without a checkout of the authors' release nothing runs, and the message names what is missing."""
    (tmp_path / "models.py").write_text("")
    (tmp_path / "configs.yaml").write_text("defaults: {}\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_release.py"), "--release", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "networks.py, tools.py not found there" in done.stderr
    assert "github.com/panmt/VeoRL" in done.stderr
    assert done.stdout == ""
