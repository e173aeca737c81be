"""The image definitions, checked by construction (no Docker daemon needed): every COPY source exists and is in
the build context, the layers are ordered for caching, the bases and indexes are build arguments, the runtime is
non-root with headless EGL, and every command the entry point maps runs (`--help`) from it. Building and running
the CPU image for real is tests/integration/test_containers.py (`make images-local`, then `pytest -m containers`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
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
    """Docker's rule: a pattern matches the path or one of its parent folders; the last matching line wins, and a
    `!` line re-includes. `**/` matches at any depth; other patterns are anchored at the context root."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in patterns:
        pattern = line.removeprefix("!")
        bare = pattern.removeprefix("**/")

        def matches(prefix: str, pattern: str = pattern, bare: str = bare) -> bool:
            if pattern.startswith("**/"):
                return fnmatch.fnmatch(Path(prefix).name, bare)
            return fnmatch.fnmatch(prefix, pattern) and prefix.count("/") >= pattern.count("/")

        if any(matches(prefix) for prefix in prefixes):
            excluded = not line.startswith("!")
    return excluded


def copy_sources(dockerfile: str) -> list[str]:
    """Build-context paths the Dockerfile copies (COPY --from=<stage> copies from a stage, not the context)."""
    sources = []
    for instruction, args in instructions(dockerfile):
        if instruction != "COPY" or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


def copies(steps: list[tuple[str, str]]) -> dict[str, int]:
    """First source of each COPY (with any --from stage prefixed, e.g. 'requirements:/tmp/requirements.txt') ->
    its step index, in the final stage."""
    final = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    found = {}
    for i, (ins, args) in enumerate(steps):
        if ins != "COPY" or i < final:
            continue
        words = shlex.split(args)
        stage = next((w.split("=", 1)[1] + ":" for w in words if w.startswith("--from=")), "")
        found.setdefault(stage + next(w for w in words if not w.startswith("--")), i)
    return found


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
    # An allowlist: what a run writes (results/, mlruns.db, a new folder) never reaches the daemon, while the
    # package's own `data` subpackage (same name as the project's data/ folder) does.
    for path in ("results/lap/x.npz", "mlruns.db", "tests/test_docs.py", "some_new_output/x", ".git/HEAD"):
        assert ignored(path, patterns), path
    assert not ignored("src/veorl/data/episodes.py", patterns)
    assert not ignored("pipelines/veorl_pipeline.yaml", patterns)


def test_dockerignore_rule_follows_docker():
    patterns = ["*", "!src", "**/__pycache__", "data/"]
    assert ignored("README.md", patterns) and not ignored("src/a.py", patterns)
    assert ignored("src/__pycache__/a.pyc", patterns) and ignored("data/x", patterns)
    assert not ignored("src/data/x", ["data"]) and ignored("src/x.pyc", ["**/*.pyc"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_layers_runtime_user_and_environment(dockerfile):
    steps = instructions(dockerfile)
    text = "\n".join(f"{i} {a}" for i, a in steps)
    copied = copies(steps)
    dependency_install = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install" in args)
    package_install = next(
        i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install --no-deps ." in args
    )
    assert "-r /tmp/requirements.txt" in steps[dependency_install][1]
    # Dependencies are installed from the pins alone, before any source is copied: a stage that sees only
    # pyproject.toml writes the requirements, so other edits to pyproject.toml keep the dependency layer cached.
    stages = [args.split()[-1] for ins, args in steps if ins == "FROM" and " AS " in args.upper()]
    assert stages == ["base", "requirements"]
    stage = next(i for i, (ins, args) in enumerate(steps) if ins == "FROM" and args.endswith("AS requirements"))
    stage_copies = [shlex.split(args)[0] for ins, args in steps[stage:] if ins == "COPY"][:2]
    assert stage_copies == ["pyproject.toml", "docker/requirements_from_pyproject.py"]
    assert copied["requirements:/tmp/requirements.txt"] < dependency_install < copied["src"] < package_install
    assert copied["pyproject.toml"] > dependency_install  # with README.md, for the package's metadata only
    assert copied["components"] < package_install and copied["pipelines"] < package_install
    # The commit is recorded after every layer, so that a new commit rebuilds none of them.
    code_version = next(i for i, (ins, args) in enumerate(steps) if ins == "ARG" and args.startswith("VEORL_CODE"))
    assert code_version > max(i for i, (ins, _) in enumerate(steps) if ins in ("RUN", "COPY"))

    users = [args.strip() for ins, args in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert "useradd" in text
    env_text = " ".join(args for ins, args in steps if ins == "ENV")
    assert "MUJOCO_GL=egl" in env_text and "VEORL_CODE_VERSION=${VEORL_CODE_VERSION}" in env_text
    assert any(ins == "ARG" and args.startswith("VEORL_CODE_VERSION") for ins, args in steps)
    assert "libegl1" in text and "libegl-mesa0" in text and "libopengl0" in text
    # KFP's launcher creates /gcs, /minio, /s3 at the root; a non-root user needs them to exist and be writable.
    assert re.search(r"mkdir -p /gcs /minio /s3", text) and "chown" in text
    entry = [args for ins, args in steps if ins == "ENTRYPOINT"]
    assert entry == ['["veorl-entrypoint"]']
    assert any(
        ins == "COPY" and args.startswith("docker/entrypoint.sh /usr/local/bin/veorl-entrypoint") for ins, args in steps
    )


def test_cuda_image_base_python_and_torch_index():
    steps = instructions("docker/Dockerfile.cuda")
    base = next(args for ins, args in steps if ins == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=nvidia/cuda:[\d.]+-runtime-ubuntu\d+\.\d+", base)
    torch_index = next(args for ins, args in steps if ins == "ARG" and args.startswith("TORCH_INDEX_URL="))
    assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", torch_index)
    assert any(ins == "RUN" and "python3.11 -m venv" in args for ins, args in steps)
    cpu_index = next(
        args
        for ins, args in instructions("docker/Dockerfile.cpu")
        if ins == "ARG" and args.startswith("TORCH_INDEX_URL=")
    )
    assert cpu_index.endswith("/whl/cpu")


@pytest.mark.parametrize(
    "dockerfile, base", [("docker/Dockerfile.cpu", "python:3.11-slim-bookworm"), ("docker/Dockerfile.cuda", "nvidia/")]
)
def test_base_indexes_and_certificates_are_build_arguments(dockerfile, base):
    """What a registry-less or proxied build overrides, with the public defaults, and nothing BuildKit-only."""
    text = (REPO / dockerfile).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M), "a syntax line makes BuildKit fetch a frontend image"
    assert "RUN --mount" not in text and "COPY --link" not in text and "<<" not in text
    steps = instructions(dockerfile)
    assert steps[0][0] == "ARG" and steps[0][1].startswith(f"BASE_IMAGE={base}")
    assert steps[1] == ("FROM", "${BASE_IMAGE} AS base")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for ins, a in steps if ins == "ARG"}
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple" and args["TORCH_INDEX_URL"].startswith("https://")
    assert args["EXTRA_CA_CERTS"] == '""'
    run = " ".join(a for ins, a in steps if ins == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in run and '--index-url "${PIP_INDEX_URL}" -r' in run
    assert "update-ca-certificates" in run and "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in run


def test_extra_ca_certificates_are_split_one_per_file(tmp_path):
    """The Dockerfiles' certificate step, run here: PEM text with two certificates -> two .crt files."""
    command = (
        next(a for ins, a in instructions("docker/Dockerfile.cpu") if ins == "RUN" and "EXTRA_CA_CERTS" in a)
        .replace("/usr/local/share/ca-certificates", str(tmp_path))
        .replace("update-ca-certificates", "true")
    )
    pem = "".join(f"-----BEGIN CERTIFICATE-----\nAAA{n}\n-----END CERTIFICATE-----\n" for n in (1, 2))
    subprocess.run(["sh", "-c", command], env={**os.environ, "EXTRA_CA_CERTS": pem}, check=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["build-extra-1.crt", "build-extra-2.crt"]
    assert (tmp_path / "build-extra-2.crt").read_text().strip() == pem.split("\n", 3)[3].strip()
    subprocess.run(["sh", "-c", command], env={**os.environ, "EXTRA_CA_CERTS": ""}, check=True)


def test_images_local_script_and_make_targets():
    script = REPO / "scripts" / "images_local.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for needed in ("--network=host", "http.server", "debootstrap --variant=minbase", "--pidfile", "docker import"):
        assert needed in text, needed
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # The image tag comes from the source, with or without a virtual environment.
    dry = subprocess.run(
        ["make", "-n", "images-local", "PYTHON=/nonexistent/python", "CODE_VERSION=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    from veorl import __version__

    assert f"IMAGE=localhost:5000/veorl:{__version__}-cpu" in dry and "scripts/images_local.sh" in dry


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
