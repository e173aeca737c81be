"""The CARLA client adapter without a server: settings, conversions, the expert's steering law, and the error when
no server answers (with a fake `carla` module, and against a closed port when the real client is installed)."""

from __future__ import annotations

import socket
import sys
import types

import numpy as np
import pytest

from veorl.envs import EnvError, make_env
from veorl.envs.carla_client import (
    CarlaSettings,
    CarlaUnreachable,
    action_to_control,
    connect,
    driving_reward,
    image_to_array,
    pursuit_steer,
)
from veorl.envs.driving import COLLISION_PENALTY


def test_settings_come_from_defaults_the_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("CARLA_HOST", "gpu-box")
    monkeypatch.setenv("CARLA_PORT", "3000")
    monkeypatch.setenv("CARLA_TIMEOUT", "2.5")
    settings = CarlaSettings.from_environment(size=64, episode_length=100)
    assert (settings.host, settings.port, settings.timeout, settings.town) == ("gpu-box", 3000, 2.5, "Town04")
    assert (settings.camera, settings.size, settings.episode_length) == ("firstperson", 64, 100)
    with pytest.raises(EnvError, match="only 'firstperson'"):
        CarlaSettings.from_environment(camera="topdown")
    with pytest.raises(EnvError, match="only 'highway'"):
        CarlaSettings.from_environment(task="merge")
    monkeypatch.setenv("CARLA_PORT", "70000")
    with pytest.raises(EnvError, match="port"):
        CarlaSettings.from_environment()


def test_actions_map_to_throttle_brake_and_steer():
    assert action_to_control(np.array([0.6, -0.2])) == pytest.approx({"throttle": 0.6, "brake": 0.0, "steer": -0.2})
    assert action_to_control(np.array([-0.5, 0.3])) == pytest.approx({"throttle": 0.0, "brake": 0.5, "steer": 0.3})
    assert action_to_control(np.array([3.0, -9.0])) == {"throttle": 1.0, "brake": 0.0, "steer": -1.0}
    with pytest.raises(EnvError, match="2 finite values"):
        action_to_control(np.array([np.nan, 0.0]))
    with pytest.raises(EnvError, match="2 finite values"):
        action_to_control(np.zeros(3))


def test_bgra_camera_bytes_become_rgb_frames():
    bgra = np.zeros((64, 64, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 255  # B, G, R, A
    frame = image_to_array(bgra.tobytes(), 64, 64)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and tuple(frame[0, 0]) == (30, 20, 10)
    with pytest.raises(EnvError, match="BGRA"):
        image_to_array(b"\x00" * 10, 64, 64)


def test_pursuit_steers_towards_the_target_and_the_reward_matches_highway_env():
    assert pursuit_steer(0.0, (0.0, 0.0), (10.0, 0.0)) == 0.0
    assert pursuit_steer(0.0, (0.0, 0.0), (10.0, 2.0)) > 0  # target to the right (CARLA's y points right)
    assert pursuit_steer(90.0, (0.0, 0.0), (-5.0, 5.0)) > 0
    assert pursuit_steer(0.0, (0.0, 0.0), (0.0, -10.0)) == -1.0
    assert driving_reward(30.0, 0.0, 3.5, False) == pytest.approx(1.0)
    assert driving_reward(25.0, 1.75, 3.5, False) == pytest.approx(0.25)
    assert driving_reward(30.0, 0.0, 3.5, True) == -COLLISION_PENALTY


def _fake_carla(answers: bool) -> types.ModuleType:
    module = types.ModuleType("carla")

    class Client:
        def __init__(self, host, port):
            self.host, self.port, self.timeout = host, port, None

        def set_timeout(self, seconds):
            self.timeout = seconds

        def get_server_version(self):
            if not answers:  # what the real client raises (checked against carla 0.9.16 and a closed port)
                raise RuntimeError(
                    f"time-out of {int(self.timeout * 1000)}ms while waiting for the simulator, make sure the "
                    f"simulator is ready and connected to {self.host}:{self.port}"
                )
            return "0.9.16"

    module.Client = Client
    return module


def test_an_unreachable_server_is_a_clear_error_naming_host_and_port():
    settings = CarlaSettings(host="carla.example", port=2345, timeout=0.2)
    with pytest.raises(CarlaUnreachable, match=r"no CARLA server answered at carla\.example:2345 within 0\.2 s"):
        connect(settings, _fake_carla(answers=False))
    client = connect(settings, _fake_carla(answers=True))
    assert client.timeout == 0.2


def test_make_env_without_the_client_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)  # import carla -> ImportError
    with pytest.raises(EnvError, match=r"pip install carla==0\.9\.16"):
        make_env("carla", "highway", "firstperson", 64, 100, 0)


def test_make_env_with_the_client_and_no_server_names_host_and_port(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", _fake_carla(answers=False))
    monkeypatch.setenv("CARLA_HOST", "127.0.0.1")
    monkeypatch.setenv("CARLA_PORT", "2999")
    monkeypatch.setenv("CARLA_TIMEOUT", "0.1")
    with pytest.raises(CarlaUnreachable, match=r"127\.0\.0\.1:2999"):
        make_env("carla", "highway", "firstperson", 64, 100, 0)


def test_the_real_client_against_a_closed_port():
    carla = pytest.importorskip("carla")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CarlaUnreachable, match=f"127.0.0.1:{port}"):
        connect(CarlaSettings(host="127.0.0.1", port=port, timeout=0.5), carla)
