#!/usr/bin/env bash
# Builds jaxvgg/native/libjaxvgg_conv.so: XLA FFI handlers that run stride-1 convolutions (forward,
# backward-data, backward-weights; float32 and bfloat16) as oneDNN primitives (jaxvgg/onednn.py).
# Needs g++ and oneDNN's headers and library: Debian's libdnnl-dev (apt-get install libdnnl-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
include=$("$PY" -c "import jax.ffi; print(jax.ffi.include_dir())")
out=jaxvgg/native/libjaxvgg_conv.so
[ -e /usr/include/oneapi/dnnl/dnnl.hpp ] || { echo "build_conv: no oneDNN headers (apt-get install libdnnl-dev)" >&2; exit 1; }
# -isystem: the XLA FFI headers warn under g++ 12; -Wall -Werror holds our own source to no warnings
g++ -O2 -std=c++17 -shared -fPIC -Wall -Werror -isystem "$include" jaxvgg/native/conv.cc -o "$out.tmp" -ldnnl
mv -f "$out.tmp" "$out"
echo "built $out"
