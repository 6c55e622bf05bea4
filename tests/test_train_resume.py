"""kill -9 in the middle of an epoch, then --resume: the same final weights as an uninterrupted run,
for classification and for segmentation. Every run is a separate process on one thread, so the
interrupted and the uninterrupted run compute in the same order (tolerance 1e-6)."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch

from test_train_engine import TINY, toy_npz

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from medtransfer.train.callbacks import Callback

    class KillAtBatch(Callback):
        '''SIGKILL this process after its n-th training batch (0: never).'''
        def __init__(self, n):
            self.n, self.seen = n, 0
        def on_batch_end(self, trainer, loss):
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGKILL)

    task, mode, data, out, kill, *overrides = sys.argv[1:]
    callbacks = (KillAtBatch(int(kill)),)
    if task == "classify":
        from medtransfer.config import load_config
        from medtransfer.train.finetune import finetune
        if mode == "resume":
            finetune(load_config("xray"), resume=out, callbacks=callbacks)
        else:
            finetune(load_config("xray", overrides=overrides), data=data, out_dir=out, callbacks=callbacks)
    else:
        from medtransfer.segmentation.config import load_seg_config
        from medtransfer.segmentation.train import train_segmentation
        cfg = load_seg_config("mri", data={"path": data}, overrides=overrides)
        train_segmentation(cfg, out, resume=mode == "resume", callbacks=callbacks)
""")


def _run(tmp_path, *args):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_model(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key].float(), wb[key].float(), atol=1e-6, rtol=0, msg=key)


def _kill_then_resume(tmp_path, task, data, kill_batch, overrides, epochs_done):
    killed = tmp_path / "killed"
    proc = _run(tmp_path, task, "new", data, killed, kill_batch, *overrides)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "model.pt").exists()
    last = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)  # intact after the kill
    assert last["epoch"] == epochs_done
    proc = _run(tmp_path, task, "resume", data, killed, 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole = tmp_path / "whole"
    proc = _run(tmp_path, task, "new", data, whole, 0, *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_model(killed / "model.pt", whole / "model.pt")
    return killed, whole


def test_classification_kill_9_mid_epoch_then_resume(tmp_path):
    npz = toy_npz(tmp_path / "toy.npz")
    # 48 training images, batch 16: 3 batches per epoch; batch 8 is inside epoch 3
    killed, whole = _kill_then_resume(tmp_path, "classify", npz, 8, TINY, epochs_done=2)
    rows = lambda d: list(csv.DictReader(open(d / "history.csv")))  # noqa: E731
    assert [r["val_loss"] for r in rows(killed)] == [r["val_loss"] for r in rows(whole)]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (killed, whole))
    assert a["test"]["auc"] == b["test"]["auc"] and a["best_epoch"] == b["best_epoch"]


def _msd_folder(root):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        label = np.zeros((16, 16, 8), np.uint8)
        x0 = 2 + i % 3
        label[x0:x0 + 6, 3:9, 2:6] = 1
        label[x0 + 6:x0 + 10, 3:9, 2:6] = 2
        image = (label * 100.0 + rng.normal(0, 5, label.shape) + 50).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"case_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i}.nii.gz"))
    return root


SEG = ["model.encoder=tiny_cnn.random", "model.weights=none", "train.epochs=3", "train.steps_per_epoch=3",
       "train.batch_size=4", "train.val_every=1", "train.overlay_plots=0", "data.spacing=[]",
       "data.val_fraction=0.4", "train.patch_size=[16, 16]", "train.sw_batch_size=8", "train.select_best=true"]


def test_segmentation_kill_9_mid_epoch_then_resume(tmp_path):
    folder = _msd_folder(tmp_path / "msd")
    # 3 steps per epoch: batch 5 is inside epoch 2 (the patch sampler's state must be restored too)
    killed, whole = _kill_then_resume(tmp_path, "segment", folder, 5, SEG, epochs_done=1)
    a, b = (list(csv.DictReader(open(d / "history.csv"))) for d in (killed, whole))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_dice_mean"] for r in a] == [r["val_dice_mean"] for r in b]


def test_resume_of_a_last_pt_from_the_previous_engine_says_so(tmp_path):
    from medtransfer.errors import MedTransferError
    from medtransfer.run import RunDirectory

    torch.save({"format": "medtransfer-last/1", "epoch": 2}, tmp_path / "last.pt")
    with pytest.raises(MedTransferError, match="earlier medtransfer.*start a new run"):
        RunDirectory(tmp_path).load_last()
