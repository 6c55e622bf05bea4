"""Adaptation modes: LoRA on a ViT (only the adapters train, merged = unmerged, less memory than a full
step), BitFit, layer-wise learning-rate decay, every mode end to end on tiny data with a model.pt that
loads weights-only and predicts as evaluated, and auto's record (both selection protocols)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.config import load_config
from medtransfer.errors import ConfigError
from medtransfer.inference.evaluate import evaluate_run
from medtransfer.run import load_run
from medtransfer.train.classifier import build_optimizer
from medtransfer.train.finetune import finetune
from medtransfer.transfer import TransferModel, adaptation, layer_groups

pytest.importorskip("peft")

FINETUNE_PLAN = ("none", "frozen", 1, "", None)  # apply_plan's arguments after the head-only epochs
TINY = ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32", "train.head_epochs=1",
        "train.finetune_epochs=2", "train.lr=0.01"]


def _vit_model(seed: int = 0) -> TransferModel:
    torch.manual_seed(seed)
    backbone, _ = load_backbone(get_weight_spec("vit_small_patch14_dinov2.lvd142m"), 1, "none")
    return TransferModel(backbone, 2)


def _step(model: TransferModel, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_lora_on_a_vit_trains_only_the_adapters_and_merges_exactly(tmp_path):
    model = _vit_model()
    plain_keys = set(model.state_dict())
    targets = adaptation.add_lora(model.backbone, rank=4, alpha=8)
    assert targets == [f"model.blocks.{i}.attn.{m}" for i in range(12) for m in ("qkv", "proj")]
    adaptation.plan_applier("lora")(model, *FINETUNE_PLAN)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # per block: qkv 384 -> 1152 and proj 384 -> 384, each adapter r x (in + out); the head 384 -> 1
    assert sum(v for n, v in trainable.items() if "lora_" in n) == 12 * 4 * ((384 + 1152) + (384 + 384)) == 110_592
    assert set(trainable) - {n for n in trainable if "lora_" in n} == {"head.1.weight", "head.1.bias"}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, y = torch.rand(4, 1, 42, 42), torch.tensor([0.0, 1.0, 0.0, 1.0])
    model.train()
    _step(model, x, y)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B left 0
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        assert adaptation.merge_lora(model) == 24
        merged = model(x)
    assert float((merged - unmerged).abs().max()) < 1e-5
    assert set(model.state_dict()) == plain_keys  # a plain network again: loads without peft
    torch.save(model.state_dict(), tmp_path / "merged.pt")
    fresh = _vit_model(seed=1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), merged)


def _peak_step_bytes(model: TransferModel, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak of the CPU memory allocated by one training step (forward, backward, AdamW step with its state),
    from the torch profiler's allocation events: the running sum of every allocation and free, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, x, y)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def test_a_lora_step_needs_less_memory_than_a_full_step():
    x, y = torch.rand(8, 1, 112, 112), torch.tensor([0.0, 1.0] * 4)
    full = _vit_model().train()
    adaptation.plan_applier("full")(full, *FINETUNE_PLAN)
    lora = _vit_model().train()
    adaptation.add_lora(lora.backbone, rank=8, alpha=16)
    adaptation.plan_applier("lora")(lora, *FINETUNE_PLAN)
    full_peak, lora_peak = _peak_step_bytes(full, x, y), _peak_step_bytes(lora, x, y)
    # measured: ~255 MB (full) vs ~107 MB (LoRA): no weight gradients or AdamW moments for the 22M frozen
    # weights, and the frozen linear layers keep no inputs for a weight gradient
    assert lora_peak < 0.6 * full_peak, (full_peak, lora_peak)


def test_bitfit_trains_biases_and_norms_only():
    model = _vit_model()
    adaptation.plan_applier("bitfit")(model, *FINETUNE_PLAN)
    names = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("bias") or ".norm" in n or n.startswith("model.norm") for n in names)
    assert "model.blocks.0.attn.qkv.weight" not in names and "model.blocks.0.norm1.weight" in names
    counts = adaptation.parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts["total"] / 100


def test_layer_decay_scales_each_group_from_the_top():
    model = _vit_model()
    cfg = load_config("xray", overrides=["train.layer_decay=0.5", "train.lr=0.01", "train.backbone_lr_mult=0.1"])
    groups = build_optimizer(model, cfg).param_groups
    n = len(layer_groups(model.backbone))
    assert n == 13  # timm's grouping: the embeddings, then one group per block (the final norm with the last)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5 ** (n - 1 - i) for i in range(n)] + [0.01])
    with pytest.raises(ConfigError, match="layer_decay applies to full fine-tuning"):
        load_config("xray", overrides=["train.adaptation=lora", "train.layer_decay=0.65"])


def _fake_npz(path, n=(60, 20, 30), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        labels = rng.integers(0, 2, size=(k, 1)).astype(np.uint8)
        images = rng.integers(0, 100, size=(k, 28, 28)).astype(np.uint8)
        images[labels[:, 0] == 1, 10:18, 10:18] += 120  # a learnable bright square
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


def _test_probabilities(run_dir):
    with open(run_dir / "predictions_test.csv", newline="") as fh:
        return np.array([float(r["prob_1"]) for r in csv.DictReader(fh)])


@pytest.mark.parametrize("mode, backbone", [("full", "tiny_cnn.random"), ("linear_probe", "tiny_cnn.random"),
                                            ("bitfit", "tiny_cnn.random"), ("lora", "tiny_cnn.random"),
                                            ("lora", "vit_small_patch14_dinov2.lvd142m")])
def test_each_mode_end_to_end(mode, backbone, tmp_path):
    npz = _fake_npz(tmp_path / "toy.npz")
    cfg = load_config("xray", overrides=[*TINY, f"model.backbone={backbone}", f"train.adaptation={mode}",
                                         "data.size=28"])
    res = finetune(cfg, data=npz, out_dir=tmp_path / "run")
    record = json.loads((res.run_dir / "metrics.json").read_text())["adaptation"]
    assert record["mode"] == mode
    p = record["parameters"]
    head = 65 if backbone.startswith("tiny") else 385
    phases = [row["phase"] for row in res.history]
    if mode == "linear_probe":
        assert phases == ["head"] * 3 and p["trainable"] == head
    else:
        assert phases == ["head", "finetune", "finetune"] and head < p["trainable"] <= p["total"]
    if mode == "lora":
        assert p["adapters"] == p["trainable"] - head and record["lora"]["merged_layers"] > 0
    if mode == "full":
        assert p["trainable"] == p["total"]  # random weights: BatchNorm trains too
    assert set(record["seconds_per_epoch"]) == set(phases)
    loaded = load_run(res.run_dir, "cpu")  # weights_only, no peft: the adapters are merged
    assert not any("lora_" in k for k in loaded.checkpoint["state_dict"])
    evaluated = evaluate_run(res.run_dir, data=npz, split="test", out_dir=tmp_path / "eval", gallery=False)
    assert evaluated["test"]["auc"] == pytest.approx(res.metrics["test"]["auc"])  # the saved model is the scored one
    np.testing.assert_allclose(_test_probabilities(tmp_path / "eval"), _test_probabilities(res.run_dir), atol=1e-5)
    card = (res.run_dir / "model_card.md").read_text()
    assert f"**adaptation**: {mode}" in card and "**trainable parameters**" in card


def _auto(tmp_path, *overrides):
    npz = _fake_npz(tmp_path / "toy.npz")
    cfg = load_config("xray", overrides=[*TINY, "train.adaptation=auto", *overrides])
    return finetune(cfg, data=npz, out_dir=tmp_path / "auto")


def test_auto_by_cross_validation_on_a_small_validation_split(tmp_path):
    res = _auto(tmp_path, "train.auto_candidates=[linear_probe, lora]", "train.auto_folds=2")
    sel = json.loads((res.run_dir / "metrics.json").read_text())["adaptation"]["selection"]
    # 20 validation images, ~10 per class: below auto_min_val_per_class (50), so cross-validation
    assert sel["protocol"] == "cv" and "smallest class has" in sel["why"]
    cands = {c["mode"]: c for c in sel["candidates"]}
    assert set(cands) == {"linear_probe", "lora"} and all(c["n_images"] == 80 for c in cands.values())
    assert all(len(c["run_dirs"]) == 2 and c["auc_ci"][0] <= c["auc"] <= c["auc_ci"][1] for c in cands.values())
    best = max(cands.values(), key=lambda c: c["auc"])
    assert sel["chosen"] == best["mode"] == res.metrics["adaptation"]["mode"] and best["mode"] in sel["reason"]
    assert res.split_report["train"]["images"] == 80 and res.split_report["val"]["images"] == 0  # refit on train+val
    assert res.metrics["val"]["n"] == 80  # out-of-fold predictions reported as val
    assert res.metrics["test"]["n"] == 30
    # the test split is scored once: by the final fit, never by a candidate
    assert list(res.run_dir.rglob("predictions_test.csv")) == [res.run_dir / "predictions_test.csv"]
    assert "adaptation chosen by**: auto (cv)" in (res.run_dir / "model_card.md").read_text()
    with pytest.raises(ConfigError, match="auto run stopped in its final fit"):  # its selection is not in last.pt
        finetune(load_config("xray"), resume=res.run_dir)


def test_auto_on_the_validation_split(tmp_path):
    res = _auto(tmp_path, "train.auto_candidates=[linear_probe, bitfit]", "train.auto_min_val_per_class=5")
    sel = res.metrics["adaptation"]["selection"]
    assert sel["protocol"] == "validation" and ">= train.auto_min_val_per_class = 5" in sel["why"]
    for c in sel["candidates"]:
        candidate = json.loads((tmp_path / "auto" / "candidates" / c["mode"] / "metrics.json").read_text())
        assert candidate["test"] is None and candidate["val"]["auc"] == c["auc"]
        assert not (tmp_path / "auto" / "candidates" / c["mode"] / "last.pt").exists()
    chosen = next(c for c in sel["candidates"] if c["mode"] == sel["chosen"])
    assert res.metrics["val"]["auc"] == pytest.approx(chosen["auc"])  # the same fit, trained again for the record


class _Crash(Exception):
    pass


class _CrashAtBatch:
    """Raise after the n-th training batch (the last.pt of the epoch before stays)."""

    key, order = "crash", 50

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __getattr__(self, hook):  # every other hook: nothing
        return lambda *args: None

    def state_dict(self):
        return {}

    def on_batch_end(self, trainer, loss):
        self.seen += 1
        if self.seen == self.n:
            raise _Crash


def test_an_interrupted_lora_run_resumes_to_the_same_weights(tmp_path):
    """The adapters live in last.pt: a resumed run rebuilds them before loading it."""
    npz = _fake_npz(tmp_path / "toy.npz")
    cfg = load_config("xray", overrides=[*TINY, "train.adaptation=lora", "train.finetune_epochs=3"])
    whole = finetune(cfg, data=npz, out_dir=tmp_path / "whole")
    with pytest.raises(_Crash):  # 3 batches per epoch (60 images, batch 16): dies in the last fine-tuning epoch
        finetune(cfg, data=npz, out_dir=tmp_path / "cut", callbacks=(_CrashAtBatch(3 + 3 + 3 + 1),))
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and any("lora_" in k for k in last["model"])
    resumed = finetune(cfg, resume=tmp_path / "cut")
    a = torch.load(whole.run_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert set(a) == set(b) and not any("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
