"""The images cannot be built here (no Docker daemon), so their definitions are checked by construction:
every COPY source exists and is not excluded from the build context, the layers are ordered for caching, the
runtime is non-root with headless EGL, and every command the entry point maps runs (`--help`) from it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("docker/Dockerfile.cpu", "docker/Dockerfile.cuda")
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    text = (REPO / dockerfile).read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(entry.split(None, 1)[0].upper(), entry.split(None, 1)[1] if " " in entry else "") for entry in logical]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(Path(prefix).name, bare) for prefix in prefixes):
            return True
    return False


def copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for instruction, args in instructions(dockerfile):
        if instruction != "COPY":
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    sources = copy_sources(dockerfile)
    assert {"pyproject.toml", "src", "components", "pipelines", "params.yaml", "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile}: COPY source {source} does not exist"
        assert not ignored(source, patterns), f"{dockerfile}: COPY source {source} is excluded by .dockerignore"
    # The package's own files must reach the image too (a too-broad ignore pattern would drop them silently).
    for module in ("src/veorl/registry.py", "components/register.py", "pipelines/steps.py"):
        assert not ignored(module, patterns)
    assert ignored(".venv/bin/python", patterns) and ignored("data/video_clips/x.npy", patterns)
    assert ignored("src/veorl/__pycache__/x.pyc", patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_layers_runtime_user_and_environment(dockerfile):
    steps = instructions(dockerfile)
    text = "\n".join(f"{i} {a}" for i, a in steps)
    order = [i for i, (instruction, args) in enumerate(steps) if instruction == "COPY"]
    copied = {shlex.split(steps[i][1])[0]: i for i in order}
    dependency_install = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install -r" in args)
    package_install = next(
        i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install --no-deps ." in args
    )
    # Dependencies are installed from pyproject.toml alone, before any source is copied.
    assert copied["pyproject.toml"] < dependency_install < copied["src"] < package_install
    assert copied["components"] < package_install and copied["pipelines"] < package_install

    users = [args.strip() for ins, args in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert "useradd" in text
    env_text = " ".join(args for ins, args in steps if ins == "ENV")
    assert "MUJOCO_GL=egl" in env_text and "VEORL_CODE_VERSION=${VEORL_CODE_VERSION}" in env_text
    assert any(ins == "ARG" and args.startswith("VEORL_CODE_VERSION") for ins, args in steps)
    assert "libegl1" in text and "libegl-mesa0" in text
    # KFP's launcher creates /gcs, /minio, /s3 at the root; a non-root user needs them to exist and be writable.
    assert re.search(r"mkdir -p /gcs /minio /s3", text) and "chown" in text
    entry = [args for ins, args in steps if ins == "ENTRYPOINT"]
    assert entry == ['["veorl-entrypoint"]']
    assert any(
        ins == "COPY" and args.startswith("docker/entrypoint.sh /usr/local/bin/veorl-entrypoint") for ins, args in steps
    )


def test_cuda_image_base_python_and_torch_index():
    steps = instructions("docker/Dockerfile.cuda")
    base = next(args for ins, args in steps if ins == "ARG" and args.startswith("CUDA_BASE="))
    assert re.fullmatch(r"CUDA_BASE=nvidia/cuda:[\d.]+-runtime-ubuntu\d+\.\d+", base)
    torch_index = next(args for ins, args in steps if ins == "ARG" and args.startswith("TORCH_INDEX_URL="))
    assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", torch_index)
    assert any(ins == "RUN" and "python3.11 -m venv" in args for ins, args in steps)
    cpu_index = next(
        args
        for ins, args in instructions("docker/Dockerfile.cpu")
        if ins == "ARG" and args.startswith("TORCH_INDEX_URL=")
    )
    assert cpu_index.endswith("/whl/cpu")


def test_requirements_come_from_the_pins_in_pyproject():
    import tomllib

    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "requirements_from_pyproject.py"),
            str(REPO / "pyproject.toml"),
            "--extra",
            "envs",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert out == project["dependencies"] + project["optional-dependencies"]["envs"]
    assert "torch==2.13.0" in out and all("==" in requirement for requirement in out)
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "requirements_from_pyproject.py"),
            str(REPO / "pyproject.toml"),
            "--extra",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "nope" in bad.stderr


def entrypoint_commands() -> dict[str, str]:
    """command -> python module, parsed from the entry point's case map."""
    mapping = {}
    for line in ENTRYPOINT.read_text().splitlines():
        match = re.match(r"\s*([\w|-]+)\)\s*module=([\w.]+)\s*;;", line)
        if match:
            for command in match.group(1).split("|"):
                mapping[command] = match.group(2)
    return mapping


def test_entry_point_covers_every_pipeline_component():
    mapping = entrypoint_commands()
    # The KFP steps call these components' `run` inside the image; each must also be a command of the entry point.
    used = set(re.findall(r"from (components\.\w+) import", (REPO / "pipelines" / "veorl_pipeline.py").read_text()))
    assert used == {
        f"components.{name}"
        for name in ("source_videos", "ingest", "collect", "pretrain", "finetune", "evaluate", "register")
    }
    assert used <= set(mapping.values())
    assert mapping["source-videos"] == "components.source_videos" and mapping["pipeline"] == "pipelines.cli"
    for module in mapping.values():
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    assert os.access(ENTRYPOINT, os.X_OK)


def test_every_mapped_command_runs_from_the_entry_point():
    """`docker run IMAGE <command> --help`, minus Docker: the same script with this venv's python on PATH."""
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO)
    )
    commands = sorted({cmd for cmd in entrypoint_commands() if "_" not in cmd})
    procs = {
        cmd: subprocess.Popen(
            ["sh", str(ENTRYPOINT), cmd, "--help"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    }
    for cmd, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{cmd}: {err[-1500:]}"
        assert "usage:" in out and ("components." in out or "pipelines.cli" in out), (
            f"{cmd}: unexpected help:\n{out[:500]}"
        )
    usage = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True)
    assert usage.returncode == 0 and all(cmd in usage.stdout for cmd in commands)
    passthrough = subprocess.run(
        ["sh", str(ENTRYPOINT), "python", "-c", "print('passthrough')"], env=env, capture_output=True, text=True
    )
    assert passthrough.stdout.strip() == "passthrough"
