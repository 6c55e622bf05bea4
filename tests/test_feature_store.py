"""Frozen features streamed to disk in chunks: the same numbers as in memory, across chunk boundaries."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.train.feature_store import FeatureStore, extract_features


def _setup(n=10, batch=3):
    torch.manual_seed(0)
    backbone, _ = load_backbone(get_weight_spec("tiny_cnn3d.random"), 1, "none")
    with torch.no_grad():  # non-trivial running statistics, so that eval mode matters
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(n, 1, 16, 16, 16)
    y = torch.arange(n) % 2
    return backbone, DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False), x, y


@pytest.mark.parametrize("chunk_rows", [4, 3, 10, 64])
def test_stored_features_equal_in_memory_features_across_chunk_boundaries(tmp_path, chunk_rows):
    backbone, loader, x, y = _setup()
    backbone.train()  # the store must switch to inference mode and back
    store = extract_features(backbone, loader, tmp_path / "f", chunk_rows=chunk_rows, progress=False)
    assert backbone.training
    backbone.eval()
    with torch.no_grad():
        expected = torch.cat([backbone(xb) for xb, _ in loader]).numpy()
    n_chunks = -(-10 // chunk_rows)
    assert store.chunk_rows == [chunk_rows] * (10 // chunk_rows) + ([10 % chunk_rows] if 10 % chunk_rows else [])
    assert len(store.chunk_rows) == n_chunks and len(store) == 10 and store.dim == backbone.num_features
    np.testing.assert_array_equal(store.features(), expected)
    np.testing.assert_array_equal(store.labels(), y.numpy())
    ds = FeatureStore.open(tmp_path / "f").dataset()
    for i in range(10):  # every row, including the first and last of each chunk
        f, label = ds[i]
        np.testing.assert_array_equal(f.numpy(), expected[i])
        assert int(label) == int(y[i])
    np.testing.assert_array_equal(ds[-1][0].numpy(), expected[-1])
    with pytest.raises(IndexError):
        ds[10]
    # the dataset view feeds a DataLoader like in-memory features do
    rows = torch.cat([f for f, _ in DataLoader(ds, batch_size=4, shuffle=False)]).numpy()
    np.testing.assert_array_equal(rows, expected)


def test_index_records_the_pass_and_unlabelled_batches(tmp_path):
    backbone, loader, x, _ = _setup(n=7, batch=2)
    unlabelled = DataLoader(x, batch_size=2)
    store = extract_features(backbone, unlabelled, tmp_path / "u", chunk_rows=3, progress=False,
                             extra={"encoder": "tiny_cnn3d.random"})
    index = json.loads((tmp_path / "u" / "index.json").read_text())
    assert index["n"] == 7 and index["chunk_rows"] == [3, 3, 1] and index["has_labels"] is False
    assert index["seconds"] > 0 and index["extra"] == {"encoder": "tiny_cnn3d.random"}
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [
        "features_00000.npy", "features_00001.npy", "features_00002.npy", "index.json"]
    assert store.labels() is None and store.dataset()[6].shape == (backbone.num_features,)
    assert isinstance(store.chunk(0), np.memmap)


def test_an_interrupted_pass_is_not_a_store(tmp_path):
    backbone, loader, _, _ = _setup()

    def failing(batches):
        for i, b in enumerate(batches):
            if i == 2:
                raise RuntimeError("disk full")
            yield b

    extract_features(backbone, loader, tmp_path / "s", chunk_rows=2, progress=False)
    with pytest.raises(RuntimeError):
        extract_features(backbone, failing(loader), tmp_path / "s", chunk_rows=2, progress=False)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        FeatureStore.open(tmp_path / "s")
