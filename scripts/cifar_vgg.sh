#!/usr/bin/env bash
# Fresh machine to the main job: set-up, then VGG-A on CIFAR-10 (arguments go to experiments.cifar_vgg).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.cifar_vgg "$@"
