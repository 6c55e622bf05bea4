"""Features of a frozen encoder, streamed to disk in chunks, and a dataset view over them.

A linear probe or a head trained on frozen features needs the encoder's output once per sample.
:func:`extract_features` runs the encoder (inference mode, no gradients) over a DataLoader and
writes its outputs as ``.npy`` chunks of ``chunk_rows`` rows, so the features of a data set larger
than memory never sit in memory together; :class:`FeatureStore` reads them back memory-mapped and
:class:`FeatureDataset` serves ``(feature, label)`` rows to a DataLoader for the head.

Layout of a store folder: ``features_00000.npy`` … (float32 ``(rows, dim)``), ``labels_00000.npy`` …
(when the loader yields labels) and ``index.json`` (rows per chunk, dim, dtype, the seconds the pass
took). ``index.json`` is written last: a folder without it is an interrupted pass.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "medtransfer-features/1"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, y, ...)`` → ``(x, y)``; a dict needs ``"image"`` (and ``"label"``)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["image"], batch.get("label")
    return batch[0], (batch[1] if len(batch) > 1 else None)


@dataclass
class FeatureStore:
    """A folder of feature chunks written by :func:`extract_features` (see the module docstring)."""

    root: Path
    dim: int
    chunk_rows: list[int]
    seconds: float
    has_labels: bool
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> FeatureStore:
        """Open a complete store (``index.json`` present)."""
        root = Path(root)
        index = root / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{root} holds no {INDEX}: not a feature store, or its pass was interrupted.")
        meta = json.loads(index.read_text())
        return cls(root, meta["dim"], meta["chunk_rows"], meta["seconds"], meta["has_labels"], meta["dtype"],
                   meta.get("extra", {}))

    def __len__(self) -> int:
        return sum(self.chunk_rows)

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / max(len(self), 1)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk ``i``'s features, memory-mapped ``(rows, dim)``."""
        return np.load(self.root / f"features_{i:05d}.npy", mmap_mode="r")

    def chunk_labels(self, i: int) -> np.ndarray | None:
        return np.load(self.root / f"labels_{i:05d}.npy", mmap_mode="r") if self.has_labels else None

    def features(self) -> np.ndarray:
        """All features in one array (for a scikit-learn probe when they fit in memory)."""
        if not self.chunk_rows:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return np.concatenate([self.chunk(i) for i in range(len(self.chunk_rows))])

    def labels(self) -> np.ndarray | None:
        if not self.has_labels:
            return None
        return np.concatenate([self.chunk_labels(i) for i in range(len(self.chunk_rows))])  # type: ignore[misc]

    def dataset(self) -> FeatureDataset:
        return FeatureDataset(self)

    def _write_index(self) -> None:
        meta = {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k != "root"}, "n": len(self)}
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".json.part")
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, self.root / INDEX)


class FeatureDataset(torch.utils.data.Dataset):
    """``(feature, label)`` rows of a :class:`FeatureStore` (``feature`` alone without labels), read
    from the memory-mapped chunks; usable with any DataLoader, shuffled or not."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._starts = list(np.cumsum([0, *store.chunk_rows[:-1]])) if store.chunk_rows else []
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.store)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray | None]:
        if c not in self._chunks:
            self._chunks[c] = (self.store.chunk(c), self.store.chunk_labels(c))
        return self._chunks[c]

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} stored features")
        i = i % len(self)
        c = bisect.bisect_right(self._starts, i) - 1
        feats, labels = self._chunk(c)
        row = torch.from_numpy(np.array(feats[i - self._starts[c]]))
        if labels is None:
            return row
        return row, torch.as_tensor(np.array(labels[i - self._starts[c]]))


class _ChunkWriter:
    """Buffers feature rows and writes them as chunks of exactly ``rows`` rows (the last may be shorter)."""

    def __init__(self, root: Path, rows: int):
        self.root, self.rows = root, rows
        self.feats: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.buffered = 0
        self.written: list[int] = []

    def add(self, feats: np.ndarray, labels: np.ndarray | None) -> None:
        self.feats.append(feats)
        if labels is not None:
            self.labels.append(labels)
        self.buffered += len(feats)
        while self.buffered >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        f = np.concatenate(self.feats)
        lab = np.concatenate(self.labels) if self.labels else None
        i = len(self.written)
        _save_npy_atomic(self.root / f"features_{i:05d}.npy", np.ascontiguousarray(f[:n]))
        if lab is not None:
            _save_npy_atomic(self.root / f"labels_{i:05d}.npy", np.ascontiguousarray(lab[:n]))
        self.written.append(n)
        self.feats = [f[n:]] if n < len(f) else []
        self.labels = [lab[n:]] if lab is not None and n < len(lab) else []
        self.buffered -= n

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


@contextlib.contextmanager
def _inference(encode: Callable[[torch.Tensor], torch.Tensor]):
    """Inference mode for an ``nn.Module`` encoder (BatchNorm uses its running statistics), restored after."""
    was = encode.training if isinstance(encode, nn.Module) else None
    if isinstance(encode, nn.Module):
        encode.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if isinstance(encode, nn.Module) and was:
            encode.train()


def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Any],
    root: str | os.PathLike[str],
    *,
    chunk_rows: int = 4096,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "features",
    extra: dict[str, Any] | None = None,
) -> FeatureStore:
    """Run the frozen ``encode`` over ``loader`` and stream its outputs into ``root`` in chunks.

    ``encode`` maps a batch ``x`` to ``(N, dim)`` features (e.g. a backbone, or normalisation then
    backbone); an ``nn.Module`` runs in inference mode. Batches are ``x``, ``(x, y)`` or a dict with
    ``image`` / ``label``. ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the encoder
    under autocast; features are stored as float32. Returns the :class:`FeatureStore`, whose
    ``seconds`` is the duration of the pass.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX).unlink(missing_ok=True)
    device = torch.device(device)
    writer = _ChunkWriter(root, chunk_rows)
    auto = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    dim = 0
    t0 = time.perf_counter()
    with bar, _inference(encode):
        task = bar.add_task(description, total=total)
        for batch in loader:
            x, y = _split_batch(batch)
            with auto():
                f = encode(x.to(device, non_blocking=True))
            f = f.detach().float().cpu().numpy()
            dim = f.shape[1]
            writer.add(f, None if y is None else torch.as_tensor(y).cpu().numpy())
            bar.advance(task)
        writer.close()
    seconds = time.perf_counter() - t0
    store = FeatureStore(root, dim, writer.written, round(seconds, 4), bool(writer.written) and
                         (root / "labels_00000.npy").is_file(), extra=dict(extra or {}))
    store._write_index()
    logger.info("%s: %d features of size %d in %.1f s (%.4f s per item) -> %s", description, len(store), dim,
                seconds, store.seconds_per_item, root)
    return store


__all__ = ["FeatureDataset", "FeatureStore", "extract_features"]
