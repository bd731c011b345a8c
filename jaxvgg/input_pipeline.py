"""Streaming input for image folders too large for memory, on grain (google's data loader for JAX; no TensorFlow).

`ImageFolderStream` reads a torchvision ImageFolder tree lazily: only the file list and labels live in
memory; JPEG decoding, the resize and (for evaluation) the center crop happen while batches are read,
in grain's reader threads and, with ``workers > 0``, in worker processes. It serves `jaxvgg.train.fit`
and `jaxvgg.train.evaluate` in place of an in-memory `jaxvgg.data.Dataset`, with the same batches:

- the order of epoch ``e`` is `jaxvgg.data.batch_indices` of (seed, e), the in-memory reader's, so a
  global shuffle per (seed, epoch) that does not depend on the process or device count;
- each process reads only its rows of every global batch (``rows``, from
  `jaxvgg.parallel.batch_rows`): its own shard of the files;
- an epoch's iterator has a JSON state (`BatchIterator.get_state`); `fit` keeps it in mid-epoch
  checkpoints and a resumed run continues with exactly the batches the uninterrupted one would read.

    stream = ImageFolderStream("data/flowers/train", image_size=256, workers=2)
    for batch in stream.batches(64, seed=0, epoch=1, drop_last=True):   # {"image": uint8 (64, 256, 256, 3), ...}
        ...
    valid = ImageFolderStream("data/flowers/valid", image_size=256, crop=224)  # Resize(256) + CenterCrop(224)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np

from jaxvgg import augment, data


@dataclasses.dataclass(frozen=True)
class _Records:
    """The examples one iterator reads, in its order: (file index, mask) pairs into the stream's files."""

    paths: tuple[str, ...]
    labels: np.ndarray
    order: np.ndarray  # int64 indices into paths
    mask: np.ndarray | None = None  # float32, 0 on the copies that pad the last evaluation batch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = int(self.order[i])
        record = {"path": self.paths[j], "label": self.labels[j]}
        if self.mask is not None:
            record["mask"] = self.mask[i]
        return record


@dataclasses.dataclass(frozen=True)
class _Decode:
    """Record -> example: the file decoded to uint8 (H, W, 3), resized, and center-cropped when ``box`` is
    given (top, left, height, width): runs in grain's threads/workers."""

    image_size: tuple[int, int]
    box: tuple[int, int, int, int] | None = None

    def read(self, path: str) -> np.ndarray:
        image = data.read_image(path, self.image_size)
        if self.box is None:
            return image
        top, left, height, width = self.box
        return np.ascontiguousarray(image[top : top + height, left : left + width])

    def __call__(self, record: dict) -> dict:
        example = {"image": self.read(record["path"]), "label": np.int32(record["label"])}
        if "mask" in record:
            example["mask"] = np.float32(record["mask"])
        return example


class BatchIterator:
    """One epoch's batches from an `ImageFolderStream` (a `jaxvgg.data.EpochBatches`), with a JSON state."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int, start_batch: int, layout: dict):
        self._iterator = iter(dataset)
        self._num_batches, self._next, self._layout = num_batches, start_batch, layout

    def __iter__(self) -> "BatchIterator":
        return self

    def __len__(self) -> int:
        return self._num_batches - self._next

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._next += 1
        return batch

    def close(self) -> None:
        """Stops grain's worker processes (and frees their shared memory) before the epoch is read to the end."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict:
        """``{"batch": batches read so far, "grain": grain's iterator state, ...the epoch's layout}``: JSON."""
        return {**self._layout, "batch": self._next, "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state` of an iterator of the same epoch, seed, batch size and rows."""
        data.check_epoch_state(state, self._layout)
        self._iterator.set_state(state["grain"])
        self._next = int(state["batch"])


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags (its own, at their defaults); a program that never parsed
    absl's command line (all of ours: argparse) marks them parsed, as grain's own tests do."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class ImageFolderStream:
    """A torchvision ImageFolder tree ``root/<class>/*.jpg|jpeg|png`` read batch by batch: a `jaxvgg.data.BatchSource`.

    Labels, class names and file order are `jaxvgg.data.load_image_folder`'s, and so are the decoded
    images (`jaxvgg.data.read_image`), resized to ``image_size``; with ``crop``, center-cropped after
    that with torchvision CenterCrop's offsets (`jaxvgg.augment.center_crop`'s): the evaluation
    transform's geometry done where the files are read, so only the crop travels to the device.

    Args:
      root: the folder whose subfolders are the classes.
      image_size: int for a square, or (height, width): every image is resized to it.
      crop: int or (height, width) no larger than ``image_size``: the center crop of every image; None: none.
      workers: grain worker processes decoding batches (0: in this process's threads).
      threads: grain reader threads per process (decoding in parallel; the order stays the same).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int], *,
                 crop: int | Sequence[int] | None = None, workers: int = 0, threads: int = 8):
        paths, labels, class_names = data.image_folder_files(root)
        self._init(tuple(map(str, paths)), labels, class_names, data._pair(image_size),
                   None if crop is None else data._pair(crop), workers, threads)
        self.root = Path(root)

    def _init(self, paths, labels, class_names, image_size, crop, workers, threads) -> None:
        if workers < 0 or threads < 1:
            raise ValueError(f"workers must be >= 0 and threads >= 1, got workers={workers}, threads={threads}")
        if crop is not None and not (0 < crop[0] <= image_size[0] and 0 < crop[1] <= image_size[1]):
            raise ValueError(f"crop {crop[0]}x{crop[1]} must be positive and fit in image_size "
                             f"{image_size[0]}x{image_size[1]}")
        self.paths, self.labels, self.class_names = paths, np.asarray(labels, np.int32), tuple(class_names)
        self.image_size, self.crop, self.workers, self.threads = image_size, crop, workers, threads

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, 3) of the images the batches hold: the crop's when there is one."""
        return (*(self.crop or self.image_size), 3)

    def _decode(self) -> _Decode:
        if self.crop is None:
            return _Decode(self.image_size)
        top, left = augment.center_crop_offsets(self.image_size, self.crop)
        return _Decode(self.image_size, (top, left, *self.crop))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int]) -> "ImageFolderStream":
        """The examples at ``indices``, in that order (`jaxvgg.data.Dataset.subset`)."""
        indices = np.asarray(indices, np.int64)
        new = object.__new__(ImageFolderStream)
        new._init(tuple(self.paths[i] for i in indices), self.labels[indices], self.class_names, self.image_size,
                  self.crop, self.workers, self.threads)
        new.root = self.root
        return new

    def take(self, n: int) -> "ImageFolderStream":
        return self.subset(np.arange(min(n, len(self))))

    def _pipeline(self, records: _Records, batch_size: int, drop_last: bool) -> grain.MapDataset:
        return grain.MapDataset.source(records).map(self._decode()).batch(batch_size, drop_remainder=drop_last)

    def _iterate(self, batched: grain.MapDataset) -> grain.IterDataset:
        dataset = batched.to_iter_dataset(grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=64))
        if self.workers:
            _absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return dataset

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = False,
                start_batch: int = 0, rows: slice | None = None) -> BatchIterator:
        """One epoch's batches, as `jaxvgg.data.Dataset.batches` gathers them from memory.

        Args:
          batch_size: the global batch size B.
          seed, epoch: the order is `jaxvgg.data.batch_indices` of them.
          shuffle: permute (else file order).
          drop_last: drop the final partial batch.
          start_batch: skip the first k batches.
          rows: only these rows of every batch (this process's share); all when None.

        Returns:
          A `BatchIterator` of ``{"image": uint8 (b, H, W, 3), "label": int32 (b,)}``.
        """
        batches = data.batch_indices(len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                     drop_last=drop_last)
        if not 0 <= start_batch <= len(batches):
            raise ValueError(f"start_batch must be in [0, {len(batches)}] for this epoch, got {start_batch}")
        local = [b if rows is None else b[rows] for b in batches]
        sizes = {len(b) for b in local[:-1]}
        if len(sizes) > 1:
            raise ValueError(f"rows {rows} give batches of different sizes {sorted(sizes)}")
        per_batch = len(local[0]) if local else 1
        order = np.concatenate(local) if local else np.zeros(0, np.int64)
        batched = self._pipeline(_Records(self.paths, self.labels, order), per_batch, drop_last=False)
        return BatchIterator(self._iterate(batched[start_batch:]), len(batches), start_batch,
                             data.epoch_layout(batch_size, seed, epoch, shuffle, drop_last, rows))

    def padded_batches(self, batch_size: int, rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
        """In-order batches padded to ``batch_size`` with a ``mask``, as `jaxvgg.data.padded_batches` makes them."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        count = -(-n // batch_size)
        order = np.concatenate([np.arange(n), np.full(count * batch_size - n, n - 1)]).astype(np.int64)
        mask = (np.arange(count * batch_size) < n).astype(np.float32)
        if rows is not None:  # this process's rows of every padded batch
            keep = np.concatenate([np.arange(b * batch_size, (b + 1) * batch_size)[rows] for b in range(count)])
            order, mask = order[keep], mask[keep]
        per_batch = batch_size if rows is None else len(range(batch_size)[rows])
        iterator = iter(self._iterate(self._pipeline(_Records(self.paths, self.labels, order, mask), per_batch, False)))

        def generate():
            try:
                yield from iterator
            finally:
                getattr(iterator, "close", lambda: None)()

        return generate()

    def load(self) -> data.Dataset:
        """Every image decoded into memory: the `jaxvgg.data.Dataset` of the same examples."""
        read = self._decode().read
        images = [read(p) for p in self.paths]
        shape = (0, *self.image_shape)
        return data.Dataset(np.stack(images) if images else np.zeros(shape, np.uint8), self.labels, self.class_names)

