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
