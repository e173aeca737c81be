"""The project's CPU image, for real: the smoke pipeline as containers through kfp.local's DockerRunner.

Marked `containers` and deselected by default. It needs a Docker daemon and the image ($VEORL_IMAGE, else the
pipeline's default localhost:5000/veorl:VERSION-cpu), both of which `make images-local` provides: it installs and
starts Docker when needed and builds the image without a registry. CI runs that right before
`python -m pytest -m containers`, so when these tests are selected a missing daemon or image is a failure that says
what to run, never a skip.

DockerRunner runs from this venv: it mounts the pipeline root (here a tmp_path) at the same path in each container
and the steps run as the calling user (pipelines.cli.docker_runner), so the MLflow store they write in the root is
read back here and the champion loads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.veorl_pipeline import DEFAULT_IMAGE, IMAGE_ENV
from veorl.storage import read_json

pytestmark = pytest.mark.containers

IMAGE = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
HOW = "run `make images-local` (it installs and starts Docker if needed and builds the image)"

# In the image: the runtime user, the CPU torch wheel, and a headless MuJoCo render through Mesa EGL with PyOpenGL
# logging at INFO (libopengl0 must keep it from reporting a missing libOpenGL.so.0).
PROBE = """
import json, logging, os
logging.basicConfig(level=logging.INFO)
import mujoco, torch
model = mujoco.MjModel.from_xml_string(
    '<mujoco><worldbody><light pos="0 0 2"/><geom type="sphere" size="0.1"/></worldbody></mujoco>'
)
data = mujoco.MjData(model)
mujoco.mj_forward(model, data)
renderer = mujoco.Renderer(model, 32, 32)
renderer.update_scene(data)
frame = renderer.render()
print(json.dumps({"uid": os.getuid(), "torch": torch.__version__, "frame": list(frame.shape),
                  "lit": int(frame.max()), "code_version": os.environ.get("VEORL_CODE_VERSION")}))
"""


@pytest.fixture(scope="module")
def docker_client():
    problem = None
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # no socket, no permission, no SDK: all mean the same here
        problem = f"no Docker daemon answers ({type(exc).__name__}: {exc}); {HOW}"
    if problem:
        pytest.fail(problem, pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(docker_client) -> str:
    import docker

    try:
        docker_client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the image {IMAGE} is missing; {HOW}, or set {IMAGE_ENV} to the image to test", pytrace=False)
    return IMAGE


def test_image_runs_headless_as_non_root_with_cpu_torch(docker_client, image):
    output = docker_client.containers.run(image, ["python", "-c", PROBE], remove=True, stdout=True, stderr=True)
    text = output.decode()
    probe = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
    assert probe["uid"] == 1000
    assert probe["torch"].endswith("+cpu"), "the image must hold the CPU torch wheel, not PyPI's CUDA one"
    assert probe["frame"] == [32, 32, 3] and probe["lit"] > 0, "MuJoCo rendered nothing through EGL"
    assert "libOpenGL" not in text, text
    assert probe["code_version"], "VEORL_CODE_VERSION is set at build time"
    usage = docker_client.containers.run(image, remove=True, stdout=True, stderr=True).decode()
    assert "source-videos" in usage and "register" in usage


def test_smoke_pipeline_in_containers_registers_a_champion_that_loads(docker_client, image, tmp_path, capsys):
    import mlflow

    from pipelines import cli
    from veorl.serving import initial_state

    root = tmp_path / "pipeline_root"
    start = time.monotonic()
    code = cli.main(
        ["run-local", "--runner", "docker", "--image", image, "--preset", "smoke", "--pipeline-root", str(root)]
    )
    captured = capsys.readouterr()
    assert code == 0, (captured.out + captured.err)[-4000:]
    outcome = json.loads(captured.out.strip().splitlines()[-1])
    print(f"smoke pipeline as containers: {time.monotonic() - start:.0f} s")
    assert outcome["registered"] == "models:/veorl-agent/1" and outcome["image"] == image
    assert outcome["tracking_uri"] == f"sqlite:///{root / 'mlruns.db'}"
    # Every step logged that it found the image (DockerRunner pulls otherwise, which fails with no registry).
    assert captured.out.count(f"Found image {image!r}") == 8

    run_dir = next(root.glob("veorl-*"))
    registration = read_json(run_dir / "register" / "registration" / "registration.json")
    assert registration["alias"] == "champion" and registration["version"] == "1"
    # The steps ran in the image: the code version they recorded is the one baked into it.
    image_env = dict(entry.split("=", 1) for entry in docker_client.images.get(image).attrs["Config"]["Env"])
    provenance = read_json(run_dir / "collect" / "episodes" / "provenance.json")
    assert provenance["code_version"] == image_env["VEORL_CODE_VERSION"]
    # What the containers wrote belongs to the caller (they run as this user).
    assert (run_dir / "finetune" / "agent").stat().st_uid == os.getuid()

    mlflow.set_tracking_uri(outcome["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/veorl-agent@champion")
    result = model.predict({"image": np.zeros((1, 64, 64, 3), np.uint8), **initial_state(model)})
    assert result["action"].shape == (1, 4) and np.all(np.abs(result["action"]) <= 1.0)
    assert Path(root / "mlartifacts").is_dir(), "the model's artifacts live beside the store, in the pipeline root"
