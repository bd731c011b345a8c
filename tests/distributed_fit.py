"""One process of tests/test_distributed.py: `fit` for a few steps, then the final parameters to an npz.

    python tests/distributed_fit.py OUT MODEL [--epochs E --steps S --workdir DIR --resume]
        [--coordinator-address H:P --num-processes N --process-id I] [--stop-at EPOCH:BATCH --stop-fd FD]

Writes OUT.npz (the parameters, then the BatchNorm statistics) and OUT.json (history) from process 0, and
OUT.predictions<I>.npy from every process I: the log-probabilities of 13 test images, computed over the mesh of
all devices (each process its rows of the padded batches, every process all 13 rows). With ``--stop-at`` the
process signals FD when it reaches that batch and waits to be killed (`tests.faults`).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import jax
import numpy as np

import jaxvgg
from jaxvgg import augment, data, distributed, evaluation, optim, parallel
from jaxvgg.train import FitConfig, TrainState, fit
from tests import faults

BATCH = 8


def dataset(n: int, seed: int) -> data.Dataset:
    rng = np.random.default_rng(seed)
    return data.Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, n).astype(np.int32), data.CIFAR10_CLASSES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out"), parser.add_argument("model")
    parser.add_argument("--coordinator-address"), parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--epochs", type=int, default=1), parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir"), parser.add_argument("--resume", action="store_true")
    faults.add_arguments(parser)
    args = parser.parse_args()
    if args.coordinator_address:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, heartbeat_timeout_s=10)
    model = jaxvgg.create_model(args.model, num_classes=10, policy=jaxvgg.Policy())
    variables = jaxvgg.init_params(args.model, jax.random.PRNGKey(0), 10, (32, 32, 3))
    state = TrainState.for_model(args.model, model, variables, optim.sgd(0.01, 0.9, 5e-4, nesterov=True),
                                 rng=jax.random.PRNGKey(1), label_smoothing=0.1)
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    # 28 validation images in batches of 12: the last one padded, split over the processes
    cfg = FitConfig(epochs=args.epochs, batch_size=BATCH, eval_batch_size=12, num_devices=jax.device_count(),
                    workdir=args.workdir, resume=args.resume, quiet=True)
    eval_tf = partial(augment.eval_transform, mean=mean, std=std)
    state, history = fit(state, dataset(args.steps * BATCH + 3, 0), dataset(28, 1), cfg,
                         train_transform=partial(augment.cifar_train_transform, mean=mean, std=std),
                         eval_transform=eval_tf, on_step=faults.hook_from(args))
    log_probs = evaluation.predict_log_probs(state, dataset(13, 2), eval_tf, batch_size=6,
                                             mesh=parallel.make_mesh(jax.device_count()))
    np.save(f"{args.out}.predictions{jax.process_index()}.npy", log_probs)
    if distributed.is_main_process():
        leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
        np.savez(args.out + ".npz", *[np.asarray(x) for x in leaves])
        with open(args.out + ".json", "w") as f:
            json.dump({"history": history, "processes": jax.process_count(), "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main()
