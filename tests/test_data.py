"""Tests of jaxvgg.data: real files in ../shared/data, corrupt files written here, image folders, splits, batches."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvgg import data

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # CI clones ../shared beside the repo
requires_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"real data folder {DATA_DIR} is missing")

# Class counts per split, from ../shared/data/README.md
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_BATCH_1_COUNTS = [1004, 989, 984, 1034, 957, 1055, 1003, 1025, 976, 973]
CIFAR_TEST_COUNTS = [1000] * 10
CIFAR_BATCH_1_SHA256 = "95bc40a96c189b4ae973b8e377256610c0b0865f59a76bf2e7b5f5d3b6a9cd51"


# ---------------------------------------------------------------------------------------------
# helpers that write small files in the official formats


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An uint8 array as IDX bytes (magic 0x0000 08 <ndim> unless given)."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_mnist(folder: Path, num_train: int = 6, num_test: int = 4, compress: bool = True) -> dict:
    """Write the four MNIST files with random content; returns the arrays written."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        image_stem, label_stem = data.MNIST_FILES[split]
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for stem, array in ((image_stem, images), (label_stem, labels)):
            payload = idx_bytes(array)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)
        arrays[split] = (images, labels)
    return arrays


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Encode (N, 32, 32, 3) RGB images and labels as CIFAR-10 binary records."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, 32, 32, 3) -> (N, 3*32*32) R, G, B planes
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def synthetic_cifar_batches(per_batch: int = 3) -> dict[str, bytes]:
    """Member name -> bytes for the six batches, with random content."""
    rng = np.random.default_rng(1)
    batches = {}
    for name in data.CIFAR10_BATCHES["train"] + data.CIFAR10_BATCHES["test"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        batches[name] = cifar_bytes(images, rng.integers(0, 10, per_batch))
    return batches


def write_cifar_tar(path: Path, batches: dict[str, bytes]) -> Path:
    """Write ``batches`` as cifar-10-batches-bin/<name> members of a .tar.gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = dict(batches, **{"batches.meta.txt": "\n".join(data.CIFAR10_CLASSES).encode()})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{data.CIFAR10_FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def decode_expected(batches: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference decode of a split, the README's recipe."""
    records = np.concatenate(
        [np.frombuffer(batches[name], np.uint8).reshape(-1, 3073) for name in data.CIFAR10_BATCHES[split]]
    )
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0]


def toy_dataset(n: int = 200, num_classes: int = 4) -> data.Dataset:
    """n examples whose single pixel holds their index (mod 256), labels cycling over the classes."""
    images = (np.arange(n) % 256).astype(np.uint8).reshape(n, 1, 1, 1)
    return data.Dataset(images, np.arange(n) % num_classes, tuple(f"c{i}" for i in range(num_classes)))


def example_ids(dataset: data.Dataset) -> np.ndarray:
    """The index each example of a toy_dataset was built from."""
    return dataset.images.reshape(-1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def mnist():
    """MNIST read once per module, through the shared folder's mnist/ subfolder."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} is missing")
    return data.load_mnist(DATA_DIR)


@pytest.fixture(scope="module")
def cifar():
    """CIFAR-10 read once per module (~2 s), from the folder holding cifar-10-binary.tar.gz."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} is missing")
    return data.load_cifar10(DATA_DIR)


def test_mnist_has_60000_train_and_10000_test_images_with_the_readme_labels_and_counts(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    assert train.class_names == data.MNIST_CLASSES
    assert train.images.max() == 255 and train.images.min() == 0


@requires_data
def test_mnist_loads_from_the_mnist_folder_itself():
    test = data.load_mnist(DATA_DIR / "mnist")["test"]
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_cifar10_has_the_readme_class_counts_shapes_and_dtypes(cifar):
    train, test = cifar["train"], cifar["test"]
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert train.images.dtype == np.uint8 and test.labels.dtype == np.int32
    assert train.images.flags["C_CONTIGUOUS"] and test.images.flags["C_CONTIGUOUS"]
    assert np.bincount(train.labels[:10000], minlength=10).tolist() == CIFAR_BATCH_1_COUNTS
    assert np.bincount(test.labels, minlength=10).tolist() == CIFAR_TEST_COUNTS
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert train.class_names == data.CIFAR10_CLASSES == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    )


def test_cifar10_decode_is_exact_and_an_extracted_folder_loads_the_same_arrays(cifar, tmp_path_factory):
    # re-encoding data_batch_1 from the decoded arrays must give the README's sha256 byte for byte
    train, test = cifar["train"], cifar["test"]
    folder = tmp_path_factory.mktemp("cifar") / data.CIFAR10_FOLDER
    folder.mkdir()
    for i, name in enumerate(data.CIFAR10_BATCHES["train"]):
        rows = slice(10000 * i, 10000 * (i + 1))
        (folder / name).write_bytes(cifar_bytes(train.images[rows], train.labels[rows]))
    (folder / "test_batch.bin").write_bytes(cifar_bytes(test.images, test.labels))
    assert hashlib.sha256((folder / "data_batch_1.bin").read_bytes()).hexdigest() == CIFAR_BATCH_1_SHA256
    loaded = data.load_cifar10(folder)  # the folder containing it: see the truncated-batch test
    np.testing.assert_array_equal(loaded["train"].images, train.images)
    np.testing.assert_array_equal(loaded["test"].labels, test.labels)


@requires_data
def test_load_dataset_reads_the_folder_named_by_the_environment(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))
    splits = data.load_dataset("mnist")
    assert len(splits["train"]) == 60000 and splits["test"].labels[:5].tolist() == [7, 2, 1, 0, 4]


# ---------------------------------------------------------------------------------------------
# IDX / MNIST files written here


def test_read_idx_reads_plain_and_gzipped_files_alike(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    (tmp_path / "plain").write_bytes(idx_bytes(images))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "plain"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "packed.gz"), images)


def test_read_idx_rejects_wrong_magic_and_names_the_file(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8), magic=0x0D03))  # dtype code 0x0D (float32)
    with pytest.raises(ValueError, match=r"bad-images-idx3-ubyte.*magic number 3331.*expected 2049.*2051"):
        data.read_idx(path)


def test_read_idx_rejects_a_truncated_payload_with_expected_and_found_sizes(tmp_path):
    payload = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = tmp_path / "short-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload[:-10]))
    with pytest.raises(ValueError, match=r"short-idx3-ubyte\.gz: dims 4x28x28 need 3136 data bytes .* found 3126"):
        data.read_idx(path)
    header_only = tmp_path / "header-idx3-ubyte"
    header_only.write_bytes(payload[:9])
    expected = r"header-idx3-ubyte: truncated header: 3 dims need 16 header bytes, file has 9"
    with pytest.raises(ValueError, match=expected):
        data.read_idx(header_only)


def test_read_idx_raises_file_not_found_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.read_idx(tmp_path / "nothing-here")


def test_load_mnist_reads_plain_idx_files_in_a_folder(tmp_path):
    written = write_mnist(tmp_path, compress=False)
    splits = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(splits["train"].images[..., 0], written["train"][0])
    np.testing.assert_array_equal(splits["test"].labels, written["test"][1])


def test_load_mnist_missing_file_lists_the_names_and_every_folder_searched(tmp_path):
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        data.load_mnist(tmp_path)
    message = str(caught.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in message
    assert str(tmp_path) in message and str(tmp_path / "mnist") in message


def test_load_mnist_count_mismatch_names_both_files(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    expected = r"t10k-images-idx3-ubyte\.gz holds 4 images but .*t10k-labels-idx1-ubyte\.gz holds 3"
    with pytest.raises(ValueError, match=expected):
        data.load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR files written here


def test_load_cifar10_reads_the_tar_path_and_the_folder_holding_it(tmp_path):
    batches = synthetic_cifar_batches()
    tar_path = write_cifar_tar(tmp_path / "dl" / data.CIFAR10_TAR, batches)
    for where in (tar_path, tar_path.parent):
        splits = data.load_cifar10(where)
        for split in ("train", "test"):
            images, labels = decode_expected(batches, split)
            np.testing.assert_array_equal(splits[split].images, images)
            np.testing.assert_array_equal(splits[split].labels, labels)
    assert len(splits["train"]) == 15 and len(splits["test"]) == 3


def test_load_cifar10_rejects_a_truncated_batch_naming_the_member_and_its_length(tmp_path):
    batches = synthetic_cifar_batches()
    batches["data_batch_3.bin"] = batches["data_batch_3.bin"][:-5]  # 3 * 3073 - 5 = 9214 bytes
    tar_path = write_cifar_tar(tmp_path / data.CIFAR10_TAR, batches)
    expected = r"cifar-10-binary\.tar\.gz:cifar-10-batches-bin/data_batch_3\.bin: 9214 bytes"
    with pytest.raises(ValueError, match=expected):
        data.load_cifar10(tar_path)
    folder = tmp_path / "x" / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    for name, payload in batches.items():
        (folder / name).write_bytes(payload)
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: 9214 bytes is not a multiple of the 3073-byte"):
        data.load_cifar10(folder.parent)


def test_load_cifar10_rejects_a_label_above_9_naming_the_file(tmp_path):
    batches = synthetic_cifar_batches()
    broken = bytearray(batches["test_batch.bin"])
    broken[3073] = 10  # the label byte of the second record
    batches["test_batch.bin"] = bytes(broken)
    with pytest.raises(ValueError, match=r"test_batch\.bin: labels must be 0-9, found 10"):
        data.load_cifar10(write_cifar_tar(tmp_path / data.CIFAR10_TAR, batches))


def test_load_cifar10_names_a_member_missing_from_the_tar(tmp_path):
    batches = synthetic_cifar_batches()
    del batches["data_batch_5.bin"]
    with pytest.raises(FileNotFoundError, match=r"members data_batch_5\.bin not found"):
        data.load_cifar10(write_cifar_tar(tmp_path / data.CIFAR10_TAR, batches))


def test_load_cifar10_without_any_data_says_what_it_looked_for_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        data.load_cifar10(tmp_path)
    message = str(caught.value)
    assert data.CIFAR10_TAR in message and "data_batch_1.bin" in message
    assert str(tmp_path / data.CIFAR10_FOLDER) in message and data.CIFAR10_URL in message


# ---------------------------------------------------------------------------------------------
# image folders


def save_image(path: Path, array: np.ndarray, mode: str | None = None):
    """Save a uint8 array with Pillow (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def solid(height: int, width: int, value: int) -> np.ndarray:
    """A (height, width, 3) uint8 RGB image of one grey value."""
    return np.full((height, width, 3), value, np.uint8)


def test_load_image_folder_sorts_classes_and_files_and_reads_rgb_uint8(tmp_path):
    save_image(tmp_path / "zebra" / "b.png", solid(6, 8, 30))
    save_image(tmp_path / "zebra" / "a.PNG", solid(6, 8, 20))  # extension case is ignored, as torchvision
    save_image(tmp_path / "ant" / "x.png", solid(6, 8, 10))
    save_image(tmp_path / "ant" / "y.jpg", solid(6, 8, 200))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    dataset = data.load_image_folder(tmp_path)
    assert dataset.class_names == ("ant", "zebra")
    assert dataset.images.shape == (4, 6, 8, 3) and dataset.images.dtype == np.uint8
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.images[:, 0, 0, 0].tolist()[0::2] == [10, 20]  # x.png, then a.PNG (sorted by name)
    assert abs(int(dataset.images[1, 3, 3, 0]) - 200) <= 2  # JPEG is lossy


def test_load_image_folder_converts_rgba_and_grayscale_to_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (10, 20, 30, 128)
    save_image(tmp_path / "a" / "rgba.png", rgba, "RGBA")
    save_image(tmp_path / "b" / "gray.png", np.full((4, 4), 77, np.uint8), "L")
    dataset = data.load_image_folder(tmp_path)
    assert dataset.images.shape == (2, 4, 4, 3)
    assert dataset.images[0, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, as torchvision's pil_loader
    assert dataset.images[1, 0, 0].tolist() == [77, 77, 77]


def test_load_image_folder_names_an_image_of_the_wrong_size_and_both_sizes(tmp_path):
    save_image(tmp_path / "a" / "first.png", solid(6, 8, 0))
    save_image(tmp_path / "b" / "odd.png", solid(5, 8, 0))
    with pytest.raises(ValueError, match=r"odd\.png is 8x5 \(WxH\) but the first image is 8x6"):
        data.load_image_folder(tmp_path)


def test_load_image_folder_resizes_every_image_bilinearly_when_given_a_size(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], (10, 1, 3))
    save_image(tmp_path / "a" / "big.png", gradient)
    save_image(tmp_path / "a" / "small.png", solid(3, 5, 90))
    dataset = data.load_image_folder(tmp_path, image_size=(4, 6))
    assert dataset.images.shape == (2, 4, 6, 3)
    expected = np.asarray(Image.fromarray(gradient).resize((6, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(dataset.images[0], expected)
    assert data.load_image_folder(tmp_path, image_size=7).images.shape == (2, 7, 7, 3)


def test_load_image_folder_names_a_file_pillow_cannot_decode(tmp_path):
    save_image(tmp_path / "a" / "good.png", solid(4, 4, 0))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.jpg"):
        data.load_image_folder(tmp_path)


def test_load_image_folder_rejects_empty_class_folders_and_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        data.load_image_folder(tmp_path)
    save_image(tmp_path / "full" / "x.png", solid(4, 4, 0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .* images in class folder\(s\): .*empty"):
        data.load_image_folder(tmp_path)


def make_flat_folder(root: Path, counts: dict[str, int]) -> None:
    """root/<class>/<class>_<i>.png, tiny images."""
    for name, count in counts.items():
        for i in range(count):
            save_image(root / name / f"{name}_{i:02d}.png", solid(2, 2, i))


def assignment(dst: Path) -> dict[str, str]:
    """file name -> split it was copied to."""
    return {path.name: path.parts[-3] for path in dst.glob("*/*/*.png")}


def test_split_image_folder_copies_per_class_fractions_deterministically(tmp_path):
    make_flat_folder(tmp_path / "src", {"cat": 8, "dog": 4})
    counts = data.split_image_folder(tmp_path / "src", tmp_path / "out1", seed=3)
    assert counts == {"train": 6, "valid": 3, "test": 3}  # cat 4/2/2, dog 2/1/1
    first = assignment(tmp_path / "out1")
    assert sorted(first) == sorted(p.name for p in (tmp_path / "src").glob("*/*.png"))  # disjoint and covering
    assert sorted(p.name for p in (tmp_path / "out1" / "train" / "dog").iterdir()).__len__() == 2
    data.split_image_folder(tmp_path / "src", tmp_path / "out2", seed=3)
    assert assignment(tmp_path / "out2") == first
    data.split_image_folder(tmp_path / "src", tmp_path / "out3", seed=4)
    assert assignment(tmp_path / "out3") != first
    assert data.load_image_folder(tmp_path / "out1" / "valid").class_names == ("cat", "dog")


def test_split_image_folder_refuses_a_non_empty_destination_and_bad_fractions(tmp_path):
    make_flat_folder(tmp_path / "src", {"cat": 2})
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.split_image_folder(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(ValueError, match=r"summing to 1, got \(0\.5, 0\.5, 0\.5\)"):
        data.split_image_folder(tmp_path / "src", tmp_path / "new", fractions=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# choosing a source, tfds


def test_resolve_data_dir_prefers_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir() is None
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_load_dataset_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'"):
        data.load_dataset("imagenet", data_dir="/nowhere")


def test_load_dataset_uses_tfds_data_source_without_a_folder(monkeypatch):
    # tfds.testing.mock_data does work with tfds.data_source in tfds 4.9.10 without TensorFlow installed
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with tfds.testing.mock_data(num_examples=5):
        mnist = data.load_dataset("mnist")
        cifar = data.load_dataset("cifar10")
    assert mnist["train"].images.shape == (5, 28, 28, 1) and mnist["test"].labels.dtype == np.int32
    assert cifar["test"].images.shape == (5, 32, 32, 3) and cifar["train"].images.dtype == np.uint8
    assert cifar["train"].class_names == data.CIFAR10_CLASSES


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_dataset_offline_says_what_to_download_where_and_how_to_pass_it(monkeypatch, name):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tfds, "data_source", offline)
    with pytest.raises(FileNotFoundError) as caught:
        data.load_dataset(name)
    message = str(caught.value)
    assert "--data-dir" in message and data.DATA_DIR_ENV in message and "no route to host" in message
    if name == "mnist":
        assert data.MNIST_URL in message
        assert all(f"{stem}.gz" in message for pair in data.MNIST_FILES.values() for stem in pair)
    else:
        assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message


def test_load_dataset_without_tensorflow_datasets_installed_gives_the_same_advice(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import tensorflow_datasets` fail
    with pytest.raises(FileNotFoundError, match=r"tensorflow_datasets.*cifar-10-binary\.tar\.gz.*JAXVGG_DATA_DIR"):
        data.load_dataset("cifar10")


# ---------------------------------------------------------------------------------------------
# Dataset, splits, batches


def test_dataset_validates_dtype_lengths_and_label_range():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="must be uint8"):
        data.Dataset(images.astype(np.float32), np.zeros(3, int), ("a",))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.Dataset(images, np.zeros(2, int), ("a",))
    with pytest.raises(ValueError, match=r"\[0, 2\) for 2 classes, got min 0 max 2"):
        data.Dataset(images, np.array([0, 1, 2]), ("a", "b"))
    dataset = data.Dataset(images, np.array([0, 1, 1], np.int64), ["a", "b"])
    assert dataset.labels.dtype == np.int32 and dataset.class_names == ("a", "b") and len(dataset) == 3


def test_dataset_take_and_subset_pick_the_right_examples():
    dataset = toy_dataset(10)
    assert example_ids(dataset.take(3)).tolist() == [0, 1, 2]
    assert example_ids(dataset.subset(np.array([7, 2]))).tolist() == [7, 2]
    with pytest.raises(ValueError, match=r"take\(n\) needs 0 <= n <= 10, got 11"):
        dataset.take(11)


def test_train_val_split_is_random_disjoint_covering_and_deterministic_per_seed():
    dataset = toy_dataset(200)
    train, val = data.train_val_split(dataset, val_fraction=0.1, seed=0)
    train_ids, val_ids = example_ids(train), example_ids(val)
    assert len(val_ids) == 20 and len(train_ids) == 180
    assert not set(train_ids) & set(val_ids) and sorted([*train_ids, *val_ids]) == list(range(200))
    assert val_ids.tolist() != list(range(180, 200))  # not "the last N"
    assert val_ids.min() < 180  # drawn from the whole range
    again_train, again_val = data.train_val_split(dataset, val_fraction=0.1, seed=0)
    assert example_ids(again_val).tolist() == val_ids.tolist()
    assert example_ids(data.train_val_split(dataset, 0.1, seed=1)[1]).tolist() != val_ids.tolist()
    np.testing.assert_array_equal(val.labels, val_ids % 4)  # labels travel with their images


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_train_val_split_rejects_fractions_that_leave_a_side_empty(fraction):
    with pytest.raises(ValueError, match=str(fraction)):
        data.train_val_split(toy_dataset(200), val_fraction=fraction)


def test_batch_indices_depend_only_on_seed_and_epoch_and_keep_the_partial_last_batch():
    batches = data.batch_indices(10, 4, seed=0, epoch=2)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    again = data.batch_indices(10, 4, seed=0, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other_epoch = np.concatenate(data.batch_indices(10, 4, seed=0, epoch=3))
    other_seed = np.concatenate(data.batch_indices(10, 4, seed=1, epoch=2))
    assert not np.array_equal(other_epoch, np.concatenate(batches))
    assert not np.array_equal(other_seed, np.concatenate(batches))
    np.testing.assert_array_equal(np.concatenate(batches), np.random.default_rng([0, 2]).permutation(10))
    assert [len(b) for b in data.batch_indices(10, 4, seed=0, epoch=2, drop_last=True)] == [4, 4]
    unshuffled = data.batch_indices(5, 2, seed=0, epoch=0, shuffle=False)
    assert [b.tolist() for b in unshuffled] == [[0, 1], [2, 3], [4]]


def test_num_batches_counts_the_partial_batch_unless_dropped():
    assert data.num_batches(10, 4) == 3 and data.num_batches(10, 4, drop_last=True) == 2
    assert data.num_batches(8, 4) == 2 and data.num_batches(0, 4) == 0
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        data.num_batches(10, 0)


def test_dataset_batches_gather_uint8_and_int32_and_resume_at_start_batch_or_from_their_state():
    dataset = toy_dataset(11)
    full = list(dataset.batches(3, seed=5, epoch=1))
    assert [b["image"].shape for b in full] == [(3, 1, 1, 1)] * 3 + [(2, 1, 1, 1)]
    assert full[0]["image"].dtype == np.uint8 and full[0]["label"].dtype == np.int32
    expected = data.batch_indices(11, 3, seed=5, epoch=1)
    for batch, indices in zip(full, expected):
        assert batch["image"].reshape(-1).tolist() == indices.tolist()
        assert batch["label"].tolist() == (indices % 4).tolist()
    resumed = list(dataset.batches(3, seed=5, epoch=1, start_batch=2))
    assert len(resumed) == 2
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(resumed, full[2:]))
    iterator = dataset.batches(3, seed=5, epoch=1)
    head = [next(iterator)]
    saved = json.loads(json.dumps(iterator.get_state()))  # what a mid-epoch checkpoint keeps
    assert saved["batch"] == 1 and len(iterator) == 3
    again = dataset.batches(3, seed=5, epoch=1)
    again.set_state(saved)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(head + list(again), full, strict=True))
    with pytest.raises(ValueError, match="another epoch or layout"):
        dataset.batches(3, seed=5, epoch=2).set_state(saved)
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 4\] for this epoch, got 5"):
        dataset.batches(3, start_batch=5)  # raised at the call, before iterating


def test_features_batch_their_vectors_as_a_batch_source_and_the_last_padded_batch_repeats_the_last_row():
    dataset = toy_dataset(11)
    features = data.Features(np.arange(22, dtype=np.float32).reshape(11, 2), dataset.labels, dataset.class_names)
    assert isinstance(dataset, data.BatchSource) and isinstance(features, data.BatchSource)
    assert isinstance(features.batches(4), data.EpochBatches)
    batches = list(features.padded_batches(4))
    assert [b["image"].shape for b in batches] == [(4, 2)] * 3
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 1, 0])
    np.testing.assert_array_equal(batches[-1]["image"][-1], features.features[-1])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:11], dataset.labels)
    np.testing.assert_array_equal(next(features.batches(4, seed=2, epoch=1))["image"],
                                  features.features[data.batch_indices(11, 4, seed=2, epoch=1)[0]])
    with pytest.raises(TypeError, match="a data set batches itself"):
        data.padded_batches(dataset, 4)
