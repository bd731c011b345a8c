"""The grain image-folder stream: the in-memory reader's batches, an iterator state that resumes exactly, and
`fit` on it, killed mid-epoch and resumed from its mid-epoch checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxvgg
from jaxvgg import augment, data, optim
from jaxvgg.input_pipeline import ImageFolderStream
from jaxvgg.train import FitConfig, TrainState, fit
from tests import faults

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, per_class: int = 13, classes: str = "abc", seed: int = 0) -> Path:
    """JPEGs of several sizes (so the resize matters) and one PNG in ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 256, (30 + i, 44, 3), dtype=np.uint8))
            image.save(root / c / (f"{i:02d}.png" if i == 3 else f"{i:02d}.jpg"))
    return root


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), i
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {i}, {k}")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow, id="2 worker processes")])
def test_stream_reads_the_in_memory_readers_batches_and_resumes_from_its_state(tmp_path, workers):
    root = make_folder(tmp_path / "folder")
    memory = data.load_image_folder(root, 32)
    stream = ImageFolderStream(root, 32, workers=workers)
    assert len(stream) == len(memory) == 39 and stream.class_names == memory.class_names
    assert isinstance(stream, data.BatchSource)
    np.testing.assert_array_equal(stream.labels, memory.labels)
    for rows in (None, slice(0, 4), slice(4, 8)):  # the whole batch, and each of 2 processes' shares
        _assert_same_batches(list(stream.batches(8, seed=3, epoch=2, drop_last=True, rows=rows)),
                             list(memory.batches(8, seed=3, epoch=2, drop_last=True, rows=rows)))
        _assert_same_batches(list(stream.padded_batches(10, rows)), list(memory.padded_batches(10, rows)))
    assert not np.array_equal(next(stream.batches(8, seed=3, epoch=1))["label"],
                              next(stream.batches(8, seed=3, epoch=2))["label"])  # a new order each epoch

    uninterrupted = list(stream.batches(8, seed=5, epoch=1))
    iterator = stream.batches(8, seed=5, epoch=1)
    head = [next(iterator), next(iterator)]
    saved = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint keeps
    iterator.close()
    resumed = stream.batches(8, seed=5, epoch=1)
    resumed.set_state(saved)
    _assert_same_batches(head + list(resumed), uninterrupted)
    with pytest.raises(ValueError, match="another epoch"):
        stream.batches(8, seed=5, epoch=2).set_state(saved)


def test_stream_center_crop_is_the_evaluation_transforms_crop(tmp_path):
    """valid/ of vgg16_transfer: Resize(256) + CenterCrop(224) when read, then normalisation only, gives the
    arrays the in-memory path's evaluation transform (resize on the device, crop, normalise) gives, to float32
    rounding."""
    from experiments import vgg16_transfer

    root = make_folder(tmp_path / "folder", per_class=3)
    stream = ImageFolderStream(root, 256, crop=224)
    assert stream.image_shape == (224, 224, 3) and stream.subset([1, 0]).crop == (224, 224)
    batch = next(iter(stream.padded_batches(9)))
    memory = data.load_image_folder(root, 256)
    assert batch["image"].shape == (9, 224, 224, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], memory.images[:, 16:240, 16:240])  # torchvision's offsets
    np.testing.assert_array_equal(stream.load().images, memory.images[:, 16:240, 16:240])
    _, eval_tf = vgg16_transfer.transforms(rotation=10, jitter=0.1)
    expected = np.asarray(eval_tf(memory.images))
    got = np.asarray(vgg16_transfer.cropped_eval(batch["image"]))
    # the device's Resize(256) of a 256x256 image is the identity up to float32 rounding of its weights
    print(f"cropped when read vs resized and cropped on the device: max |d| {np.max(np.abs(got - expected)):.1e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="crop 300x300 must be positive and fit in image_size 256x256"):
        ImageFolderStream(root, 256, crop=300)


def _transforms():
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    return (partial(augment.cifar_train_transform, mean=mean, std=std),
            partial(augment.eval_transform, mean=mean, std=std))


def _state():
    model = jaxvgg.create_model("cifar_cnn", policy=jaxvgg.Policy())
    return TrainState.for_model("cifar_cnn", model, jaxvgg.init_params("cifar_cnn", jax.random.PRNGKey(0)),
                                optim.sgd(0.01, 0.9, 5e-4), rng=jax.random.PRNGKey(1))


def test_fit_on_a_stream_trains_exactly_as_on_the_arrays(tmp_path):
    root = make_folder(tmp_path / "folder", per_class=20)
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=2, batch_size=8, eval_batch_size=16, quiet=True)
    memory = data.load_image_folder(root, 32)
    stream = ImageFolderStream(root, 32)
    a, history_a = fit(_state(), memory, memory, cfg, train_transform=train_tf, eval_transform=eval_tf)
    b, history_b = fit(_state(), stream, stream, cfg, train_transform=train_tf, eval_transform=eval_tf)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    assert history_a["batch"]["loss"] == history_b["batch"]["loss"]
    assert history_a["epoch"]["val_loss"] == history_b["epoch"]["val_loss"]


_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from jaxvgg.input_pipeline import ImageFolderStream
    from jaxvgg.train import FitConfig, fit
    from tests.test_input_pipeline import _state, _transforms
    train_tf, eval_tf = _transforms()
    stream = ImageFolderStream(sys.argv[2], 32, workers=int(sys.argv[3]))
    cfg = FitConfig(epochs=2, batch_size=4, eval_batch_size=16, workdir=sys.argv[1], resume=True, quiet=True,
                    checkpoint_every_steps=10)
    if __name__ == "__main__":
        from tests import faults
        parser = __import__("argparse").ArgumentParser()
        faults.add_arguments(parser)
        on_step = faults.hook_from(parser.parse_args(sys.argv[4:]))
        state, history = fit(_state(), stream, stream.take(16), cfg, train_transform=train_tf, eval_transform=eval_tf,
                             on_step=on_step)
        np.savez(sys.argv[1] + "/final.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)])
""")


# the CI budget on the Zen 3 EPYC (36 s each): both run with the slow tests; fit's and the two-process kills stay in CI
@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, pytest.param(2, id="2 worker processes")])
def test_fit_killed_mid_epoch_resumes_from_the_mid_epoch_save_as_if_never_stopped(tmp_path, workers):
    """SIGKILL at batch 15 of epoch 2 (the child signals it reached it and waits), after the mid-epoch save at
    batch 10 (saves every 10 steps): the resumed run reads the rest of the epoch from the saved iterator state
    and ends with the uninterrupted run's parameters and history."""
    root = make_folder(tmp_path / "folder", per_class=40)  # 120 images: 30 steps an epoch
    script = tmp_path / "run.py"
    script.write_text(_RUN.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    command = lambda out: [sys.executable, str(script), str(out), str(root), str(workers)]  # noqa: E731
    subprocess.run(command(reference), check=True, env=env, capture_output=True, timeout=600)

    faults.kill_at(command(killed), 2, 15, env)
    assert not (killed / "checkpoints" / "last" / "2").exists()
    partial_dir = killed / "checkpoints" / "partial"
    assert [p.name for p in partial_dir.iterdir() if p.name.isdigit()] == ["40"]  # epoch 1's 30 steps + 10

    out = subprocess.run(command(killed), check=True, env=env, capture_output=True, text=True, timeout=600)
    assert "in epoch 2, after batch 10 of 30" in out.stdout + out.stderr
    with np.load(reference / "final.npz") as a, np.load(killed / "final.npz") as b:
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ref, res = (json.loads((d / "history.json").read_text()) for d in (reference, killed))
    assert ref["batch"] == res["batch"]
    assert ref["epoch"]["train_loss"] == pytest.approx(res["epoch"]["train_loss"], rel=1e-12)
    assert ref["epoch"]["val_loss"] == res["epoch"]["val_loss"]
