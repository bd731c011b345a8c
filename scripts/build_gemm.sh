#!/usr/bin/env bash
# Builds jaxvgg/native/libjaxvgg_gemm.so: an XLA FFI handler that computes float32 matrix products with
# MKL's cblas_sgemm (jaxvgg/gemm.py). Needs g++ and the `mkl` extra installed in the venv
# (pip install -e ".[mkl]"); links MKL's runtime from the venv's lib/ by absolute rpath.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
prefix=$("$PY" -c "import sys; print(sys.prefix)")
include=$("$PY" -c "import jax.ffi; print(jax.ffi.include_dir())")
out=jaxvgg/native/libjaxvgg_gemm.so
[ -e "$prefix/lib/libmkl_rt.so.3" ] || { echo "build_gemm: no $prefix/lib/libmkl_rt.so.3 (pip install -e '.[mkl]')" >&2; exit 1; }
# -isystem: the XLA FFI headers warn under g++ 12; -Wall -Werror holds our own source to no warnings
g++ -O2 -std=c++17 -shared -fPIC -Wall -Werror -isystem "$include" jaxvgg/native/gemm.cc -o "$out.tmp" \
    -L"$prefix/lib" -l:libmkl_rt.so.3 -Wl,-rpath,"$prefix/lib"
mv -f "$out.tmp" "$out"
echo "built $out"
