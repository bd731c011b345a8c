// XLA FFI handler: C = op(A) @ op(B) for row-major float32 matrices, through MKL's cblas_sgemm.
// Built by scripts/build_gemm.sh into libjaxvgg_gemm.so; registered and called by jaxvgg/gemm.py.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error Sgemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                 bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("jaxvgg sgemm: 2-d operands only");
  const int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  const int64_t k_b = trans_b ? db[1] : db[0], n = trans_b ? db[0] : db[1];
  if (k != k_b) return ffi::Error::InvalidArgument("jaxvgg sgemm: contracting dimensions differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill_n(c->typed_data(), m * n, 0.0f);
    return ffi::Error::Success();
  }
  cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
              a.typed_data(), std::max<int64_t>(da[1], 1), b.typed_data(), std::max<int64_t>(db[1], 1), 0.0f,
              c->typed_data(), n);
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvggSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
