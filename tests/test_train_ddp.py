"""DDP under torchrun: two CPU processes on gloo write the same run directory shape as one process."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from medtransfer.config import load_config
from medtransfer.train.finetune import finetune
from test_train_engine import TINY, toy_npz

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import sys
    from medtransfer.config import load_config
    from medtransfer.train.finetune import finetune
    npz, out, *overrides = sys.argv[1:]
    finetune(load_config("xray", overrides=overrides), data=npz, out_dir=out)
""")


def _shape(obj):
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items() if k != "minutes"}
    if isinstance(obj, list):
        return ["list"] if obj and isinstance(obj[0], (dict, list)) else "list"
    return type(obj).__name__ if obj is not None else "null"


def test_two_process_gloo_run_matches_single_process_shape(tmp_path):
    npz = toy_npz(tmp_path / "toy.npz", n=(40, 21, 15))  # odd sizes: the gathered shards must drop padding
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    overrides = TINY[:4] + ["train.head_epochs=1", "train.finetune_epochs=1", "train.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(npz), str(tmp_path / "ddp"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finetune(load_config("xray", overrides=overrides), data=npz, out_dir=tmp_path / "one")

    m_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert _shape(m_ddp) == _shape(m_one)
    assert m_ddp["val"]["n"] == m_one["val"]["n"] == 21 and m_ddp["test"]["n"] == 15
    # the gathered predictions are in dataset order, one row per image, no padded duplicates
    rows = lambda d: [r["path"] for r in csv.DictReader(open(tmp_path / d / "predictions_val.csv"))]  # noqa: E731
    assert rows("ddp") == rows("one")
    hist = list(csv.DictReader(open(tmp_path / "ddp" / "history.csv")))
    assert [h["phase"] for h in hist] == ["head", "finetune"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "ddp").iterdir())  # no stray temp files


SEG_SCRIPT = textwrap.dedent("""
    import sys
    from medtransfer.segmentation.config import load_seg_config
    from medtransfer.segmentation.train import train_segmentation
    data, out, *overrides = sys.argv[1:]
    train_segmentation(load_seg_config("mri", data={"path": data}, overrides=overrides), out)
""")


def test_two_process_gloo_segmentation_trains_and_writes_one_run(tmp_path):
    from medtransfer.segmentation.inference import predict_segmentation
    from test_train_resume import SEG, _msd_folder

    folder = _msd_folder(tmp_path / "msd")
    script = tmp_path / "seg.py"
    script.write_text(SEG_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(folder), str(tmp_path / "ddp"), *SEG]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = list(csv.DictReader(open(tmp_path / "ddp" / "history.csv")))
    assert [h["epoch"] for h in hist] == ["1", "2", "3"] and all(h["val_dice_mean"] for h in hist)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["val"]["n_cases"] == 2 and metrics["training"]["epochs_run"] == 3
    rows = predict_segmentation(tmp_path / "ddp", [folder / "imagesTr"], tmp_path / "pred")
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}
    assert not any(p.name.startswith(".") for p in (tmp_path / "ddp").iterdir())  # one writer: no stray temp files
