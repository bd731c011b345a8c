#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs jaxvgg with its torch and dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.jaxvgg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[torch,dev,mkl]"
    touch "$stamp"
fi
# MKL's sgemm as an XLA custom call (jaxvgg/gemm.py); without it the XLA dots run, nothing else changes.
gemm=jaxvgg/native/libjaxvgg_gemm.so
if [ "$(uname -m)" = x86_64 ] && { [ ! -f "$gemm" ] || [ jaxvgg/native/gemm.cc -nt "$gemm" ]; }; then
    bash scripts/build_gemm.sh || echo "note: scripts/build_gemm.sh failed; matrix products stay XLA's" >&2
fi
# oneDNN's convolutions as XLA custom calls (jaxvgg/onednn.py, Policy.conv="onednn"): Debian's libdnnl-dev
# (OpenMP build) and the handler; optional: without them Policy.conv stays "xla" and nothing else changes.
if [ "$(uname -m)" = x86_64 ] && [ ! -e /usr/include/oneapi/dnnl/dnnl.hpp ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null; then
    apt-get install -y -q libdnnl-dev >/dev/null 2>&1 || echo "note: apt-get install libdnnl-dev failed" >&2
fi
conv=jaxvgg/native/libjaxvgg_conv.so
if [ -e /usr/include/oneapi/dnnl/dnnl.hpp ] && { [ ! -f "$conv" ] || [ jaxvgg/native/conv.cc -nt "$conv" ]; }; then
    bash scripts/build_conv.sh || echo "note: scripts/build_conv.sh failed; convolutions stay XLA's" >&2
fi
# tcmalloc: the experiments re-exec with it preloaded (jaxvgg/runtime.py); optional, so a machine
# without root or apt just runs with the system allocator.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
            || echo "note: apt-get install libtcmalloc-minimal4 failed; using the system allocator" >&2
    fi
fi
