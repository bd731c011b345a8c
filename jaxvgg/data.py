"""Disk -> numpy arrays -> batches.

Every data set is read once into whole uint8 arrays (NHWC images, int32 labels); training then
iterates permuted index batches over them (the airbench ``CifarLoader`` habit). Nothing here
imports JAX: augmentation runs on the device, in ``jaxvgg.augment``.

    splits = load_dataset("cifar10", data_dir="/work/shared/data")   # or JAXVGG_DATA_DIR, or tfds
    train, val = train_val_split(splits["train"], val_fraction=0.1, seed=0)
    for batch in train.batches(128, seed=0, epoch=3):
        ...  # batch["image"]: uint8 (B, 32, 32, 3), batch["label"]: int32 (B,)

What `jaxvgg.train.fit`, `evaluate` and `predict` read is a `BatchSource`: `Dataset` and `Features` here,
`jaxvgg.input_pipeline.ImageFolderStream` for image folders streamed from disk.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

MNIST_CLASSES = tuple(str(digit) for digit in range(10))  # the names tfds gives its ClassLabel
CIFAR10_CLASSES = (  # label order of cifar-10-batches-bin/batches.meta.txt
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DATA_DIR_ENV = "JAXVGG_DATA_DIR"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched case-insensitively, as torchvision does
SPLIT_NAMES = ("train", "valid", "test")

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # split -> (images file, labels file), the names of the original release
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_TAR = "cifar-10-binary.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_BATCHES = {  # split -> member file names, in the order they are concatenated
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # label byte, then the R, G, B planes, each row-major 32x32

IDX_MAGIC = {2049: "labels (idx1)", 2051: "images (idx3)"}
IDX_UINT8 = 0x08

# ---------------------------------------------------------------------------------------------
# What the training loop reads


@runtime_checkable
class EpochBatches(Protocol):
    """One epoch's training batches: an iterator with a JSON state, so a mid-epoch save resumes it."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def __len__(self) -> int: ...  # batches left

    def get_state(self) -> dict:
        """JSON: the epoch's layout (`epoch_layout`) and how far it has been read."""
        ...

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state` of an iterator of the same layout."""
        ...

    def close(self) -> None:
        """Frees what the iterator holds (worker processes) before the epoch is read to the end."""
        ...


@runtime_checkable
class BatchSource(Protocol):
    """A labelled example set that batches itself: what `jaxvgg.train.fit`, `evaluate` and `predict` read.

    Implemented by `Dataset`, `Features` and `jaxvgg.input_pipeline.ImageFolderStream`. A batch is
    ``{"image": (b, ...) inputs, "label": int32 (b,)}``, plus ``"mask"`` float32 (b,) in padded batches.
    """

    labels: np.ndarray  # int32 (N,), in the order padded_batches gives the examples
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False, start_batch: int = 0, rows: slice | None = None) -> EpochBatches:
        """One epoch's batches in the order `batch_indices` gives (``rows``: this process's rows of each)."""
        ...

    def padded_batches(self, batch_size: int, rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
        """In-order batches, the last one padded (`padded_batches`)."""
        ...


def epoch_layout(batch_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                 rows: slice | None) -> dict:
    """What an epoch's batches depend on, as JSON: the part of an `EpochBatches` state that must match."""
    return {"seed": seed, "epoch": epoch, "batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
            "rows": None if rows is None else [rows.start, rows.stop]}


def check_epoch_state(state: dict, layout: dict) -> None:
    """Raises unless a saved `EpochBatches` state is of an epoch with ``layout``."""
    mismatch = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
    if mismatch:
        raise ValueError(f"iterator state is of another epoch or layout: {mismatch} (saved, this)")


class ArrayBatches:
    """An `EpochBatches` gathered from whole arrays (`Dataset.batches`, `Features.batches`)."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, indices: list[np.ndarray], start_batch: int,
                 layout: dict):
        if not 0 <= start_batch <= len(indices):
            raise ValueError(f"start_batch must be in [0, {len(indices)}] for this epoch, got {start_batch}")
        self._inputs, self._labels, self._indices = inputs, labels, indices
        self._next, self._layout = start_batch, layout

    def __iter__(self) -> "ArrayBatches":
        return self

    def __len__(self) -> int:
        return len(self._indices) - self._next

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= len(self._indices):
            raise StopIteration
        indices = self._indices[self._next]
        self._next += 1
        return {"image": self._inputs[indices], "label": self._labels[indices]}

    def get_state(self) -> dict:
        return {**self._layout, "batch": self._next}

    def set_state(self, state: dict) -> None:
        check_epoch_state(state, self._layout)
        self._next = int(state["batch"])

    def close(self) -> None:
        """Nothing to free: the arrays are the data set's."""


class _ArraySource:
    """The `BatchSource` methods of a set held as whole arrays (``_inputs``: what a batch's "image" holds)."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    _inputs: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False, start_batch: int = 0, rows: slice | None = None) -> ArrayBatches:
        """One epoch's batches gathered from the arrays, in the order of `batch_indices`.

        Args:
            batch_size: B > 0 (the global batch).
            seed, epoch: the order (see `batch_indices`).
            shuffle: permute the examples.
            drop_last: drop the final partial batch.
            start_batch: skip the first k batches (resuming mid-epoch), 0 <= k <= the epoch's batches.
            rows: gather only these rows of every batch (one process's share of the global batch,
                `jaxvgg.parallel.batch_rows`); the order does not depend on it.

        Returns:
            An `ArrayBatches` of ``{"image": (B, ...), "label": int32 (B,)}``; a bad ``start_batch``
            raises here, at the call.
        """
        indices = batch_indices(len(self.labels), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                drop_last=drop_last)
        indices = indices if rows is None else [i[rows] for i in indices]
        return ArrayBatches(self._inputs, self.labels, indices, start_batch,
                            epoch_layout(batch_size, seed, epoch, shuffle, drop_last, rows))

    def padded_batches(self, batch_size: int, rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
        """In-order batches, each padded to ``batch_size`` (`padded_batches` of the arrays)."""
        return padded_batches(self._inputs, batch_size, labels=self.labels, rows=rows)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class Dataset(_ArraySource):
    """A whole labelled image set in memory.

    Attributes:
        images: uint8 (N, H, W, C), NHWC.
        labels: int32 (N,), each in ``range(len(class_names))``.
        class_names: one name per label index.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer (N,), got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        class_names = tuple(str(name) for name in self.class_names)
        if not class_names:
            raise ValueError("class_names is empty")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(class_names)}) for {len(class_names)} classes, "
                f"got min {labels.min()} max {labels.max()}"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
        object.__setattr__(self, "class_names", class_names)

    @property
    def _inputs(self) -> np.ndarray:
        return self.images

    def subset(self, indices) -> Dataset:
        """The examples at ``indices`` (any numpy index: int array, bool mask, slice), same classes.

        Args:
            indices: an index into the first axis.

        Returns:
            A new Dataset (a copy for fancy indices, a view for slices).
        """
        return Dataset(self.images[indices], self.labels[indices], self.class_names)

    def take(self, n: int) -> Dataset:
        """The first ``n`` examples.

        Args:
            n: how many, 0 <= n <= len(self).

        Returns:
            A Dataset viewing the first n examples.
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"take(n) needs 0 <= n <= {len(self)}, got {n}")
        return self.subset(slice(0, n))


# ---------------------------------------------------------------------------------------------
# MNIST: IDX files


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when it starts with the gzip magic."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: gzip data is corrupt or truncated ({err})") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one MNIST IDX file (gzipped or plain) into a uint8 array.

    Args:
        path: an ``*-idx1-ubyte`` (labels) or ``*-idx3-ubyte`` (images) file, optionally ``.gz``.

    Returns:
        uint8 array of the header's dims: (N,) for labels, (N, rows, cols) for images.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: wrong magic number, or a header or payload shorter/longer than its dims say.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header (at least 4 expected)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in IDX_MAGIC:
        expected = ", ".join(f"{m} (0x{m:08x}, {kind})" for m, kind in IDX_MAGIC.items())
        raise ValueError(
            f"{path}: not an MNIST IDX file: magic number {magic} (0x{magic:08x}), expected {expected}; "
            f"bytes 3-4 are the dtype code (0x{IDX_UINT8:02x} = uint8) and the number of dims"
        )
    num_dims = data[3]
    header_bytes = 4 + 4 * num_dims
    if len(data) < header_bytes:
        raise ValueError(
            f"{path}: truncated header: {num_dims} dims need {header_bytes} header bytes, file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", num_dims, offset=4))
    expected_payload = math.prod(dims)
    payload = len(data) - header_bytes
    if payload != expected_payload:
        raise ValueError(
            f"{path}: dims {'x'.join(map(str, dims))} need {expected_payload} data bytes after the "
            f"{header_bytes}-byte header, found {payload} (truncated or corrupt file)"
        )
    return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(dims).copy()  # writable, like CIFAR


def _find_file(stem: str, folders: Sequence[Path]) -> Path | None:
    """The first of ``stem`` or ``stem.gz`` found in ``folders``, else None."""
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(data_dir: str | os.PathLike) -> dict[str, Dataset]:
    """Read MNIST from the four IDX files of the original release.

    Args:
        data_dir: a folder holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``, or whose ``mnist/``
            subfolder holds them.

    Returns:
        ``{"train": 60000 examples, "test": 10000 examples}``, images uint8 (N, 28, 28, 1).

    Raises:
        FileNotFoundError: a file is missing (the message lists the names and every folder searched).
        ValueError: a corrupt file, or image and label counts that disagree.
    """
    data_dir = Path(data_dir)
    folders = [data_dir, data_dir / "mnist"]
    stems = [stem for pair in MNIST_FILES.values() for stem in pair]
    found = {stem: _find_file(stem, folders) for stem in stems}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found: {', '.join(f'{s}[.gz]' for s in missing)}; looked in "
            f"{', '.join(str(f) for f in folders)}. Download the four files from {MNIST_URL} into one of them."
        )
    splits = {}
    for split, (image_stem, label_stem) in MNIST_FILES.items():
        image_path, label_path = found[image_stem], found[label_stem]
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3:
            raise ValueError(f"{image_path}: expected images (N, rows, cols), found dims {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"{label_path}: expected labels (N,), found dims {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(
                f"MNIST {split}: {image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
            )
        if len(labels) and labels.max() >= len(MNIST_CLASSES):
            raise ValueError(f"{label_path}: labels must be 0-9, found {labels.max()}")
        splits[split] = Dataset(images[..., None], labels, MNIST_CLASSES)  # (N, 28, 28) -> (N, 28, 28, 1)
    return splits


# ---------------------------------------------------------------------------------------------
# CIFAR-10: binary batches, in a tar.gz or extracted


def _decode_cifar_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split one CIFAR-10 binary batch into views: images (N, 32, 32, 3) RGB and labels (N,)."""
    if len(data) % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{source}: {len(data)} bytes is not a multiple of the {CIFAR10_RECORD_BYTES}-byte CIFAR-10 record "
            f"(truncated or corrupt file)"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    if len(labels) and labels.max() >= len(CIFAR10_CLASSES):
        raise ValueError(f"{source}: labels must be 0-9, found {labels.max()}")
    # (N, 3072) -> (N, 3, 32, 32) planes -> (N, 32, 32, 3) NHWC; a view, copied once by the caller
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_members_from_tar(tar_path: Path, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
    """``names`` -> (bytes, source description), read in one pass over the tar, nothing extracted."""
    wanted, found = set(names), {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:  # one sequential pass: seeking backwards in a .gz re-decompresses it
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    found[base] = (tar.extractfile(member).read(), f"{tar_path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{tar_path}: cannot read the tar archive ({err})") from err
    missing = sorted(wanted - set(found))
    if missing:
        raise FileNotFoundError(f"{tar_path}: members {', '.join(missing)} not found in the archive")
    return found


def _cifar_source(data_dir: Path) -> Path:
    """The tar file or extracted batches folder that ``data_dir`` points at."""
    if data_dir.is_file():
        return data_dir
    candidates = [data_dir, data_dir / CIFAR10_FOLDER]
    for folder in candidates:
        if (folder / CIFAR10_BATCHES["test"][0]).is_file():
            return folder
    if (data_dir / CIFAR10_TAR).is_file():
        return data_dir / CIFAR10_TAR
    raise FileNotFoundError(
        f"CIFAR-10 not found: looked for {CIFAR10_TAR} in {data_dir} and for the extracted batch files "
        f"(data_batch_1.bin ... data_batch_5.bin, test_batch.bin) in {', '.join(str(f) for f in candidates)}. "
        f"Download {CIFAR10_URL} into {data_dir}."
    )


def load_cifar10(data_dir: str | os.PathLike) -> dict[str, Dataset]:
    """Read CIFAR-10 from the official binary distribution.

    Args:
        data_dir: the path of ``cifar-10-binary.tar.gz``, a folder containing it, a
            ``cifar-10-batches-bin/`` folder, or a folder containing that folder. An extracted folder
            is preferred over a tar beside it (no decompression). The tar is read in memory, never extracted.

    Returns:
        ``{"train": 50000 examples (data_batch_1..5 in order), "test": 10000}``, images uint8 (N, 32, 32, 3) RGB.

    Raises:
        FileNotFoundError: nothing CIFAR-like at ``data_dir``, or a batch file/member is missing.
        ValueError: a batch whose length is not a whole number of 3073-byte records, or a label > 9.
    """
    source = _cifar_source(Path(data_dir))
    names = [name for split in CIFAR10_BATCHES.values() for name in split]
    if source.is_file():
        blobs = _cifar_members_from_tar(source, names)
    else:
        blobs = {}
        for name in names:
            if not (source / name).is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {name} not found in {source}")
            blobs[name] = ((source / name).read_bytes(), str(source / name))
    splits = {}
    for split, batch_names in CIFAR10_BATCHES.items():
        decoded = [_decode_cifar_batch(*blobs[name]) for name in batch_names]
        total = sum(len(labels) for _, labels in decoded)
        images = np.empty((total, 32, 32, 3), np.uint8)  # C-contiguous, filled with one copy per batch
        start = 0
        for batch_images, _ in decoded:
            images[start : start + len(batch_images)] = batch_images
            start += len(batch_images)
        labels = np.concatenate([labels for _, labels in decoded])
        splits[split] = Dataset(images, labels, CIFAR10_CLASSES)
    return splits


# ---------------------------------------------------------------------------------------------
# torchvision ImageFolder layout


def _class_folders(root: Path) -> list[Path]:
    """The class subfolders of ``root``, sorted by name as torchvision's ImageFolder sorts them."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not folders:
        raise FileNotFoundError(f"{root} has no class subfolders (expected root/<class>/<image>)")
    return folders


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (jpg/jpeg/png, any case), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name
    )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width); an int means a square."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return int(height), int(width)


def image_folder_files(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """(image paths, int32 labels, class names) of a torchvision ImageFolder tree, in `load_image_folder`'s order.

    Raises:
        FileNotFoundError: no class folders, or a class folder without images.
    """
    root = Path(root)
    folders = _class_folders(root)
    files_per_class = [_image_files(folder) for folder in folders]
    empty = [str(folder) for folder, files in zip(folders, files_per_class) if not files]
    if empty:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in class folder(s): {', '.join(empty)}")
    paths = [path for files in files_per_class for path in files]
    labels = np.concatenate([np.full(len(files), label, np.int32) for label, files in enumerate(files_per_class)])
    return paths, labels, tuple(f.name for f in folders)


def read_image(path: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB, bilinearly resized to ``image_size`` when given (torchvision's
    loader: grayscale, palette and RGBA files become RGB, alpha dropped).

    Raises:
        ValueError: Pillow cannot decode it.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow is only needed for image files

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    if image_size is not None:
        height, width = _pair(image_size)
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)  # PIL takes (w, h)
    return np.asarray(rgb, dtype=np.uint8)


def load_image_folder(root: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> Dataset:
    """Read a torchvision ImageFolder tree ``root/<class>/*.jpg|jpeg|png`` into memory.

    Classes are the subfolder names sorted alphabetically (label i = i-th name), files sorted by
    name within each class. Every image is decoded with Pillow and converted to RGB (grayscale,
    palette and RGBA files included; alpha is dropped as torchvision's loader drops it). For a tree
    too large for memory, stream it: `jaxvgg.input_pipeline.ImageFolderStream`.

    Args:
        root: the folder whose subfolders are the classes.
        image_size: if given (int for a square, or (height, width)), each image is resized to it with
            bilinear filtering; if None, every image must already have the size of the first one.

    Returns:
        A Dataset with images uint8 (N, H, W, 3).

    Raises:
        FileNotFoundError: no class folders, or a class folder without images.
        ValueError: an image Pillow cannot decode, or (without image_size) an image of another size.
    """
    paths, labels, class_names = image_folder_files(root)
    target = None if image_size is None else _pair(image_size)
    images = []
    for path in paths:
        array = read_image(path, target)
        if images and array.shape != images[0].shape:
            height, width = images[0].shape[:2]
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]} (WxH) but the first image is {width}x{height}; "
                f"pass image_size to resize every image"
            )
        images.append(array)
    return Dataset(np.stack(images), labels, class_names)


def split_image_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fractions: Sequence[float] = (0.5, 0.25, 0.25),
    seed: int = 0,
) -> dict[str, int]:
    """Copy a flat ``src/<class>/*`` tree into ``dst/train|valid|test/<class>/``, per class, at random.

    Each class's files (sorted by name) are shuffled with one seeded generator and cut into
    ``round(n * fractions[0])`` train, ``round(n * fractions[1])`` valid and the rest test files,
    so the same seed gives the same split.

    Args:
        src: ImageFolder-style folder with one subfolder per class.
        dst: where to write; must not exist or be empty.
        fractions: (train, valid, test) fractions, each >= 0, summing to 1.
        seed: seed of the shuffle.

    Returns:
        Number of files copied per split: ``{"train": ..., "valid": ..., "test": ...}``.

    Raises:
        FileExistsError: ``dst`` exists and is not empty.
        ValueError: bad fractions.
        FileNotFoundError: ``src`` has no class folders, or a class has no images.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be 3 non-negative numbers (train, valid, test) summing to 1, got {fractions}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"refusing to overwrite {dst}: it exists and is not an empty folder")
    folders = _class_folders(src)
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for folder in folders:
        files = _image_files(folder)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in class folder {folder}")
        order = rng.permutation(len(files))
        num_train = int(round(len(files) * fractions[0]))
        num_valid = min(int(round(len(files) * fractions[1])), len(files) - num_train)
        bounds = {"train": (0, num_train), "valid": (num_train, num_train + num_valid)}
        bounds["test"] = (num_train + num_valid, len(files))
        for split, (start, stop) in bounds.items():
            out = dst / split / folder.name
            out.mkdir(parents=True, exist_ok=True)  # empty class folders too, so every split has every class
            for index in order[start:stop]:
                shutil.copy2(files[index], out / files[index].name)
            counts[split] += stop - start
    return counts


# ---------------------------------------------------------------------------------------------
# Choosing a source: a folder on disk, else tensorflow-datasets


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where to read data from: the argument, else ``$JAXVGG_DATA_DIR``, else None.

    Args:
        data_dir: an explicit folder (e.g. from ``--data-dir``); wins when given.

    Returns:
        The folder as a Path, or None when neither is set (then tfds is used).
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir)
    from_env = os.environ.get(DATA_DIR_ENV, "")
    return Path(from_env) if from_env else None


def _download_help(name: str) -> str:
    """What to download for ``name``, where to put it and how to point jaxvgg at it."""
    if name == "mnist":
        files = ", ".join(f"{stem}.gz" for pair in MNIST_FILES.values() for stem in pair)
        what = f"download {files} from {MNIST_URL} into a folder DIR (or DIR/mnist/)"
    else:
        what = f"download {CIFAR10_URL} into a folder DIR (or pass the .tar.gz path itself as DIR)"
    return f"{what}, then pass --data-dir DIR or set {DATA_DIR_ENV}=DIR"


def _records_to_dataset(records: Sequence[dict], class_names: tuple[str, ...]) -> Dataset:
    """Stack tfds records (dicts with "image" (H, W, C) uint8 and "label") into a Dataset."""
    images = np.stack([np.asarray(record["image"], np.uint8) for record in records])
    labels = np.asarray([int(record["label"]) for record in records], np.int32)
    return Dataset(images, labels, class_names)


def _read_tfds_records(name: str) -> dict[str, list[dict]]:
    """Every record of the train and test splits through ``tfds.data_source`` (ArrayRecord, no TensorFlow)."""
    import tensorflow_datasets as tfds  # lazy: slow to import and only needed without a data folder

    records = {}
    for split in ("train", "test"):
        source = tfds.data_source(name, split=split)
        # one record at a time: source.__getitems__ fails under tfds.testing.mock_data in tfds 4.9.10
        records[split] = [source[i] for i in range(len(source))]
    return records


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """Load MNIST or CIFAR-10 as whole arrays, from a folder if one is given, else tensorflow-datasets.

    Args:
        name: "mnist" or "cifar10".
        data_dir: folder (or, for cifar10, tar path) to read; if None, ``$JAXVGG_DATA_DIR``; if that is
            unset too, ``tfds.data_source(name)`` (downloads into the tfds data folder when online).

    Returns:
        ``{"train": Dataset, "test": Dataset}`` with uint8 NHWC images.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: no folder given and tfds unavailable or offline; the message says what to
            download, where to put it and how to pass it.
    """
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}, expected one of {sorted(loaders)}")
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        return loaders[name](folder)
    try:
        records = _read_tfds_records(name)
    except Exception as err:  # ImportError, offline download, missing optional deps: all end in the same advice
        raise FileNotFoundError(
            f"no data folder given for {name!r} and tensorflow-datasets could not provide it "
            f"({type(err).__name__}: {err}). To use local files: {_download_help(name)}."
        ) from err
    class_names = MNIST_CLASSES if name == "mnist" else CIFAR10_CLASSES
    return {split: _records_to_dataset(split_records, class_names) for split, split_records in records.items()}


# ---------------------------------------------------------------------------------------------
# Splits and batches


def train_val_split(dataset: Dataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a random ``val_fraction`` of ``dataset`` for validation.

    Args:
        dataset: the examples to split.
        val_fraction: fraction in (0, 1) going to validation (``round(N * val_fraction)`` examples).
        seed: seed of the permutation; the same seed gives the same split.

    Returns:
        (train, val), disjoint and together covering ``dataset``, each in the original order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_val = int(round(len(dataset) * val_fraction))
    if not 0 < num_val < len(dataset):
        raise ValueError(
            f"val_fraction {val_fraction} of {len(dataset)} examples leaves {num_val} for validation and "
            f"{len(dataset) - num_val} for training; both must be non-empty"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    # sorted: each part keeps the original order (contiguous gathers); which examples go where is random
    return dataset.subset(np.sort(order[num_val:])), dataset.subset(np.sort(order[:num_val]))


@dataclasses.dataclass(frozen=True, eq=False)
class Features(_ArraySource):
    """Feature vectors with labels: a `BatchSource`, so `fit`, `evaluate` and `predict` train a head on them.

    Attributes:
        features: float32 (N, D), what a batch's ``"image"`` holds (the head's input).
        labels: int32 (N,).
        class_names: one name per label index.
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def _inputs(self) -> np.ndarray:
        return self.features


def pad_batch(batch: dict, multiple: int) -> dict:
    """Pad the leading axis to a multiple of ``multiple`` by repeating the last example, with ``mask`` 0 on copies.

    The result always has a ``"mask"`` (ones for real examples unless the batch had one), so full and
    padded batches share one pytree structure and one compiled step. Arrays come back as NumPy.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    size = np.shape(batch["label"])[0]
    if size == 0:
        raise ValueError("cannot pad an empty batch: there is no last example to repeat")
    batch = {key: np.asarray(x) for key, x in batch.items()}
    if "mask" not in batch:
        batch["mask"] = np.ones((size,), np.float32)
    pad = -size % multiple
    if pad == 0:
        return batch

    def pad_one(key: str, x: np.ndarray) -> np.ndarray:
        fill = np.zeros((pad, *x.shape[1:]), x.dtype) if key == "mask" else np.repeat(x[-1:], pad, axis=0)
        return np.concatenate([x, fill], axis=0)

    return {key: pad_one(key, x) for key, x in batch.items()}


def padded_batches(inputs: np.ndarray, batch_size: int, *, labels: np.ndarray | None = None,
                   rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
    """In-order batches of whole arrays, each padded to ``batch_size`` (`pad_batch`).

    Every batch has ``"image"`` (rows of ``inputs``: images or feature vectors), ``"label"`` (zeros
    without ``labels``) and ``"mask"`` (0 on the copies that pad the last one), so one compiled
    program serves all of them; ``int(mask.sum())`` is the number of real examples. ``rows``: only
    these rows of every padded batch (one process's share, `jaxvgg.parallel.batch_rows`), so over
    all processes each example counts exactly once. A `BatchSource` gives its own:
    ``dataset.padded_batches(batch_size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(inputs, np.ndarray) and not hasattr(inputs, "__array__"):
        raise TypeError(f"padded_batches takes an array of inputs, got {type(inputs).__name__}; "
                        "a data set batches itself: dataset.padded_batches(batch_size)")
    labels = np.zeros(len(inputs), np.int32) if labels is None else labels

    def generate():
        for start in range(0, len(inputs), batch_size):
            batch = pad_batch({"image": inputs[start:start + batch_size], "label": labels[start:start + batch_size]},
                              batch_size)
            yield batch if rows is None else {k: v[rows] for k, v in batch.items()}

    return generate()


def num_batches(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one epoch: ``ceil(N / B)``, or ``floor(N / B)`` with drop_last.

    Args:
        num_examples: N >= 0.
        batch_size: B > 0.
        drop_last: drop a final partial batch.

    Returns:
        The number of batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def batch_indices(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """The example indices of every batch of one epoch.

    The order is ``np.random.default_rng([seed, epoch]).permutation(N)``: a function of (seed, epoch)
    only, so a resumed run reproduces any epoch's order without replaying earlier epochs.

    Args:
        num_examples: N >= 0.
        batch_size: B > 0.
        seed: run seed, >= 0.
        epoch: epoch number, >= 0.
        shuffle: permute; if False the order is 0..N-1.
        drop_last: drop the final partial batch (it is kept by default).

    Returns:
        A list of int64 index arrays, all of length B except possibly the last.
    """
    count = num_batches(num_examples, batch_size, drop_last)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle else np.arange(num_examples)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]
