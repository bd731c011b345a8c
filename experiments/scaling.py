"""Scale-out measurements: the grain image-folder stream against the step it feeds, and P processes against one.

    python -m experiments.scaling --part input --json build/scaling_input.json
    python -m experiments.scaling --part processes --models cifar_cnn,vgg11,mnist_lenet --json build/scaling_proc.json

input: images/s of `jaxvgg.input_pipeline.ImageFolderStream` reading a folder of JPEGs (``--image-folder``,
else one written here: ``--images`` random 500x375 JPEGs in 10 classes, ImageNet's typical size) resized
to 256 (vgg16_transfer's load size) with 0, 1 and 2 grain workers, against the vgg16_transfer training
step at 224x224 it would feed (the whole model, frozen features, batch ``--batch-size``); and the
CIFAR-10-shaped whole-array gather (`jaxvgg.data.Dataset.batches`) against grain over the same arrays.

processes: `jaxvgg.train.fit` of each model on synthetic data for 2 epochs of ``--steps`` steps, as 1
process with all cores and as 2 processes pinned to one core each (loopback, gloo), the same global
batch; images/s of the second epoch (compiled), from process 0's history.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from experiments.common import at_least, parse_config, run_cli
from jaxvgg import runtime


@dataclasses.dataclass(frozen=True)
class Config:
    part: str = dataclasses.field(default="input", metadata={"help": "what to measure", "choices": ["input",
                                                                                                   "processes"]})
    image_folder: str | None = dataclasses.field(default=None, metadata={
        "help": "a <class>/ folder of images to stream (default: random JPEGs written to a temporary folder)"})
    images: int = dataclasses.field(default=512, metadata={"help": "JPEGs to write without --image-folder",
                                                           "check": at_least(1)})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "batch of the stream and of the steps"})
    models: str = dataclasses.field(default="cifar_cnn,vgg11,mnist_lenet", metadata={
        "help": "comma-separated models of --part processes"})
    steps: int = dataclasses.field(default=30, metadata={"help": "training steps per epoch (--part processes)"})
    json: str | None = dataclasses.field(default=None, metadata={"help": "also write the numbers here"})


def _write_jpegs(root: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.roll(base, 7 * i, axis=1) // 2 + rng.integers(0, 128, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _rate(iterator, count_key: str = "label") -> float:
    start, n = time.perf_counter(), 0
    for batch in iterator:
        n += len(batch[count_key])
    return n / (time.perf_counter() - start)


def measure_input(cfg: Config) -> dict:
    """The input side: the grain stream of JPEGs, one vgg16_transfer step, CIFAR-10-shaped arrays against grain."""
    results: dict = {"batch_size": cfg.batch_size}
    results.update(_measure_stream(cfg))
    results.update(_measure_transfer_step(cfg.batch_size))
    results.update(_measure_arrays_against_grain())
    return results


def _measure_stream(cfg: Config) -> dict:
    """images/s of the grain stream of JPEGs resized to 256 (0, 1, 2 workers), and of the center-cropped one."""
    from jaxvgg.input_pipeline import ImageFolderStream

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(cfg.image_folder) if cfg.image_folder else _write_jpegs(Path(tmp) / "images", cfg.images)
        for workers in (0, 1, 2):
            stream = ImageFolderStream(root, 256, workers=workers)
            iterator = stream.batches(cfg.batch_size, seed=0, epoch=1, drop_last=True)
            first = next(iterator)  # worker start-up is not throughput
            rate = _rate(iterator)
            iterator.close()
            results[f"stream_workers_{workers}_images_per_s"] = rate
            print(f"grain stream, {len(stream)} JPEGs -> 256x256, {workers} workers: {rate:.0f} images/s "
                  f"(first batch {first['image'].shape})")
        # vgg16_transfer's valid/: Resize(256) + CenterCrop(224) in the readers, padded evaluation batches
        stream = ImageFolderStream(root, 256, crop=224)
        results["stream_eval_crop_images_per_s"] = _rate(iter(stream.padded_batches(cfg.batch_size)))
        print(f"grain stream, {len(stream)} JPEGs -> 256x256 -> center 224x224, padded batches, 0 workers: "
              f"{results['stream_eval_crop_images_per_s']:.0f} images/s")
    return results


def _measure_transfer_step(batch_size: int) -> dict:
    """images/s of vgg16_transfer's training step at 224x224 (frozen features), on random 256x256 images."""
    import jax

    import jaxvgg
    from jaxvgg import augment, optim, parallel
    from jaxvgg.train import TrainState, augmented_train_step

    model = jaxvgg.create_model("vgg16_transfer", 10)
    params = jaxvgg.init_params("vgg16_transfer", jax.random.PRNGKey(0), 10)
    tx = optim.create_optimizer("adam", 1e-3, trainable=jaxvgg.trainable_mask("vgg16_transfer", params["params"]))
    state = TrainState.for_model("vgg16_transfer", model, params, tx, rng=jax.random.PRNGKey(1))
    train_tf, _ = augment.transfer_transforms(15.0, 0.2)  # vgg16_transfer's defaults
    step = parallel.compile_step(partial(augmented_train_step, transform=train_tf), state.policy, "train",
                                 donate_state=True)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (batch_size, 256, 256, 3), dtype=np.uint8),
             "label": np.zeros(batch_size, np.int32)}
    state, metrics = step(state, batch)
    float(metrics["loss"])
    start, steps = time.perf_counter(), 3
    for _ in range(steps):
        state, metrics = step(state, batch)
    float(metrics["loss"])
    rate = steps * batch_size / (time.perf_counter() - start)
    print(f"vgg16_transfer training step at 224x224 (frozen features, {state.policy.describe()}): {rate:.1f} images/s")
    return {"vgg16_transfer_step_images_per_s": rate}


def _measure_arrays_against_grain() -> dict:
    """images/s of CIFAR-10-shaped batches of 128: the whole-array gather against grain over the same arrays."""
    import grain

    from jaxvgg import data

    rng = np.random.default_rng(0)
    cifar = data.Dataset(rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                         rng.integers(0, 10, 50000).astype(np.int32), data.CIFAR10_CLASSES)
    results = {"cifar_arrays_images_per_s": _rate(cifar.batches(128, seed=0, epoch=1, drop_last=True))}
    order = np.concatenate(data.batch_indices(len(cifar), 128, seed=0, epoch=1, drop_last=True))
    records = [{"image": cifar.images[i], "label": cifar.labels[i]} for i in order[:12800]]
    pipeline = grain.MapDataset.source(records).batch(128).to_iter_dataset(grain.ReadOptions(num_threads=8))
    results["cifar_grain_images_per_s"] = _rate(iter(pipeline))
    print(f"CIFAR-10-shaped batches of 128: whole arrays {results['cifar_arrays_images_per_s']:.0f} images/s, "
          f"grain over the same examples {results['cifar_grain_images_per_s']:.0f} images/s")
    return results


def _worker(out: str, model: str, steps: int, batch_size: int) -> None:
    """One process of --part processes (the launch flags come from the command line)."""
    import jax

    import jaxvgg
    from jaxvgg import data, distributed, optim
    from jaxvgg.train import FitConfig, TrainState, fit

    if "--coordinator" in sys.argv:
        i = sys.argv.index("--coordinator")
        distributed.initialize(sys.argv[i + 1], int(sys.argv[i + 2]), int(sys.argv[i + 3]))
    spec_shape = (28, 28, 1) if model.startswith("mnist") else (32, 32, 3)
    classes = data.MNIST_CLASSES if model.startswith("mnist") else data.CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    train = data.Dataset(rng.integers(0, 256, (steps * batch_size, *spec_shape), dtype=np.uint8),
                         rng.integers(0, 10, steps * batch_size).astype(np.int32), classes)
    net = jaxvgg.create_model(model, num_classes=10) if not model.startswith("mnist") else jaxvgg.create_model(model)
    params = jaxvgg.init_params(model, jax.random.PRNGKey(0), 10, spec_shape)
    state = TrainState.for_model(model, net, params, optim.sgd(0.01, 0.9), rng=jax.random.PRNGKey(1))
    to_float = lambda x: x.astype(np.float32) / 255.0  # noqa: E731
    _, history = fit(state, train, None, FitConfig(epochs=2, batch_size=batch_size, num_devices=jax.device_count(),
                                                   quiet=True),
                     train_transform=lambda key, x: to_float(x), eval_transform=to_float)
    if distributed.is_main_process():
        Path(out).write_text(json.dumps({"images_per_s": history["epoch"]["images_per_s"][-1]}))


def _run_together(commands: list[list[str]], timeout_s: float = 900) -> None:
    """Runs the commands at once (one CPU device each, the system allocator); all must end with status 0."""
    env = {**runtime.environ_with_cpu_devices(1), "JAXVGG_ALLOCATOR": "system"}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        errors = [p.communicate(timeout=timeout_s)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError("a measuring process failed:\n" + "\n".join(e[-2000:] for e in errors))


def measure_processes(cfg: Config) -> dict:
    from jaxvgg import distributed

    results = {}
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        for model in cfg.models.split(","):
            out = Path(tmp) / f"{model}.json"
            args = [sys.executable, "-m", "experiments.scaling", "--worker", str(out), model, str(cfg.steps),
                    str(cfg.batch_size)]
            _run_together([args])
            one = json.loads(out.read_text())["images_per_s"]
            port = distributed.free_port()
            _run_together([["taskset", "-c", str(i % cores), *args, "--coordinator", f"127.0.0.1:{port}", "2", str(i)]
                           for i in range(2)])
            two = json.loads(out.read_text())["images_per_s"]
            results[model] = {"one_process_images_per_s": one, "two_processes_images_per_s": two, "ratio": two / one}
            print(f"{model}: 1 process x {cores} cores {one:.0f} images/s, 2 processes x 1 core {two:.0f} images/s "
                  f"({two / one:.2f}x)")
    return results


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    results = measure_input(cfg) if cfg.part == "input" else measure_processes(cfg)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:4], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(run_cli(main, sys.argv[1:]))
