"""Shared fixtures. No test may reach the network: sockets are blocked for the whole session."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import shutil

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SHARED_DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class NetworkBlocked(RuntimeError):
    pass


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path (multiprocessing, DataLoader workers)
        return True
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    return host in _LOCAL_HOSTS or host.startswith("127.")


def _refuse(what) -> None:
    raise NetworkBlocked(
        f"A test tried to reach the network ({what}); tests must run offline. "
        "Write the checkpoint/data the test needs into tmp_path instead."
    )


@pytest.fixture(autouse=True, scope="session")
def _no_network(tmp_path_factory):
    """Block connections beyond this machine (loopback and Unix sockets stay allowed for worker
    processes and the gloo backend) and keep every cache inside a temporary folder."""
    home = tmp_path_factory.mktemp("medtransfer_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTRANSFER_HOME", str(home))
    mp.setenv("MEDTRANSFER_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TORCH_HOME", str(home / "torch"))
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if not _is_local(address):
            _refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            _refuse(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        h = host.decode() if isinstance(host, bytes) else str(host or "")
        if h not in _LOCAL_HOSTS and not h.startswith("127."):
            _refuse(h)
        return real_getaddrinfo(host, *args, **kwargs)

    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    yield home
    mp.undo()


def toy_binary_npz(path, sizes=(48, 16, 16)):
    """A learnable two-class MedMNIST-style file (28 px gray; class 1 carries a bright square), with
    ``sizes`` images in train, val and test."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        y = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(path, **arrays)
    return path


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (the shared/data folder sits beside the clone in CI)")
    return path


def bundled(name: str) -> str:
    """A test file shipped inside the pydicom wheel itself (never downloads)."""
    from pydicom.data import get_testdata_file

    return get_testdata_file(name, download=False)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small synthetic demo dataset (12 patients) shared by the tests."""
    from medtransfer.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), n_patients=12, seed=7, size=128)


def _write_sr(path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientID = "SR001"
    ds.PatientName = "SYNTHETIC^SRPATIENT"
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


@pytest.fixture
def messy_folder(small_demo, tmp_path):
    """A folder of 3 good DICOM files (one without suffix, nested), broken files and an SR."""
    folder = tmp_path / "inbox"
    (folder / "nested" / "deeper").mkdir(parents=True)
    good = sorted((small_demo / "images").rglob("*.dcm"))[:3]
    shutil.copy(good[0], folder / "good1.dcm")
    shutil.copy(good[1], folder / "nested" / "IMG0002")  # no suffix
    shutil.copy(good[2], folder / "nested" / "deeper" / "good3.dcm")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("this is not DICOM\n")
    data = good[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    ds = pydicom.dcmread(good[0])
    ds.PixelData = ds.PixelData[:-1000]
    ds.save_as(folder / "short_pixels.dcm")
    sr_uid = _write_sr(folder / "report.dcm")
    return folder, sr_uid


@pytest.fixture(scope="session")
def lite0_demo_run(tmp_path_factory):
    """EfficientNet-Lite0 (real ImageNet weights from the pip package) fine-tuned briefly at 128 px on a
    72-patient demo set (seed 7): ``(demo_dir, run_dir)``. Test AUC about 0.98 when measured; used where a
    test needs a model that has learnt the finding (saliency sanity checks, export parity)."""
    from medtransfer.config import load_config
    from medtransfer.data.demo import generate_demo_dataset
    from medtransfer.train.finetune import finetune

    demo = generate_demo_dataset(tmp_path_factory.mktemp("demo72"), n_patients=72, seed=7)
    cfg = load_config("xray", overrides=["data.size=128", "train.head_epochs=1", "train.finetune_epochs=4",
                                         "train.batch_size=16"])
    out = tmp_path_factory.mktemp("lite0_run")
    finetune(cfg, data=demo, labels=demo / "labels.csv", out_dir=out)
    return demo, out
