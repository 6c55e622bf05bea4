"""Shared fixtures. No test may reach the network: sockets are blocked for the whole session."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class NetworkBlocked(RuntimeError):
    pass


def _blocked(*args, **kwargs):
    raise NetworkBlocked(
        "A test tried to open a network connection; tests must run offline. "
        "Write the checkpoint/data the test needs into tmp_path instead."
    )


@pytest.fixture(autouse=True, scope="session")
def _no_network(tmp_path_factory):
    """Block outbound connections and keep every cache inside a temporary folder."""
    home = tmp_path_factory.mktemp("medtransfer_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTRANSFER_HOME", str(home))
    mp.setenv("MEDTRANSFER_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TORCH_HOME", str(home / "torch"))
    mp.setattr(socket.socket, "connect", _blocked)
    mp.setattr(socket.socket, "connect_ex", _blocked)
    mp.setattr(socket, "create_connection", _blocked)
    mp.setattr(socket, "getaddrinfo", _blocked)
    yield home
    mp.undo()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (the shared/data folder sits beside the clone in CI)")
    return path


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small synthetic demo dataset (12 patients) shared by the tests."""
    from medtransfer.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), n_patients=12, seed=7, size=128)
