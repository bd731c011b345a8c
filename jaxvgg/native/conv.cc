// XLA FFI handlers: stride-1 2-d convolutions (NHWC activations, HWIO kernels, symmetric zero padding) as
// oneDNN primitives: the forward pass, the gradient with respect to the input (backward-data) and the
// gradient with respect to the kernel (backward-weights). Operands are float32, or bfloat16 with float32
// accumulation; every result is float32. Built by scripts/build_conv.sh into libjaxvgg_conv.so; registered
// and called by jaxvgg/onednn.py.
//
// Each primitive is created once per (pass, dtype, shape) and kept; a call only reorders its operands into
// the layouts the primitive chose (when they differ from NHWC/HWIO), executes it and reorders the result
// back. Calls are pure functions of their operands. A primitive whose implementation is oneDNN's reference
// code ("ref:...") is refused: it is orders of magnitude slower than XLA's own forms, so the caller falls
// back to those.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Pass : int { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// (pass, bf16?, N, H, W, C_in, C_out, KH, KW, padding)
using Key = std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Conv {
  dnnl::primitive primitive;
  // the pass's three arguments, the two operands and the result: the primitive's own layouts, the layouts
  // of the buffers XLA passes (NHWC/HWIO), and their DNNL_ARG_* names
  memory::desc a, b, result;
  memory::desc user_a, user_b, user_result;
  int arg_a, arg_b, arg_result;
  memory::desc scratchpad;  // user-managed: each call brings its own, so no state is shared between calls
  std::string impl;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Shapes {
  memory::desc src, weights, dst;           // NHWC / HWIO / NHWC, in the operands' dtype
  memory::desc src_any, weights_any, dst_any;  // the same dims, layout of the primitive's choosing
  memory::dims strides{1, 1}, padding;
};

Shapes MakeShapes(const Key& key, memory::data_type operands, memory::data_type result_type, int pass) {
  auto [p, bf16, n, h, w, cin, cout, kh, kw, pad] = key;
  const int64_t oh = h + 2 * pad - kh + 1, ow = w + 2 * pad - kw + 1;
  // the operands of each pass are in `operands`; its result in `result_type`
  const auto src_t = pass == kBackwardData ? result_type : operands;
  const auto wei_t = pass == kBackwardWeights ? result_type : operands;
  const auto dst_t = pass == kForward ? result_type : operands;
  Shapes s;
  const memory::dims src{n, cin, h, w}, wei{cout, cin, kh, kw}, dst{n, cout, oh, ow};
  s.src = memory::desc(src, src_t, tag::nhwc);
  s.weights = memory::desc(wei, wei_t, tag::hwio);
  s.dst = memory::desc(dst, dst_t, tag::nhwc);
  s.src_any = memory::desc(src, src_t, tag::any);
  s.weights_any = memory::desc(wei, wei_t, tag::any);
  s.dst_any = memory::desc(dst, dst_t, tag::any);
  s.padding = {pad, pad};
  return s;
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Shapes& s, dnnl::prop_kind kind) {
  dnnl::convolution_forward::desc d(kind, dnnl::algorithm::convolution_direct, s.src_any, s.weights_any,
                                    s.dst_any, s.strides, s.padding, s.padding);
  return dnnl::convolution_forward::primitive_desc(d, Attr(), Engine());
}

// Creates (or finds) the primitive for `key`; throws where oneDNN has only its reference code or none.
const Conv& Lookup(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, Conv> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  const int pass = std::get<0>(key);
  const bool bf16 = std::get<1>(key);
  const auto operands = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  const Shapes s = MakeShapes(key, operands, memory::data_type::f32, pass);
  Conv conv;
  if (pass == kForward) {
    auto pd = ForwardPd(s, dnnl::prop_kind::forward_training);
    conv = {dnnl::convolution_forward(pd), pd.src_desc(), pd.weights_desc(), pd.dst_desc(), s.src, s.weights, s.dst,
            DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST, pd.scratchpad_desc(), pd.impl_info_str()};
  } else {
    // the forward hint: in the operands' dtype, as the forward pass that produced them
    const Shapes f = MakeShapes(key, operands, operands, kForward);
    auto hint = ForwardPd(f, dnnl::prop_kind::forward_training);
    if (pass == kBackwardData) {
      dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, s.src_any, s.weights_any,
                                              s.dst_any, s.strides, s.padding, s.padding);
      dnnl::convolution_backward_data::primitive_desc pd(d, Attr(), Engine(), hint);
      // operands: diff_dst, weights; result: diff_src
      conv = {dnnl::convolution_backward_data(pd), pd.diff_dst_desc(), pd.weights_desc(), pd.diff_src_desc(),
              s.dst, s.weights, s.src, DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC,
              pd.scratchpad_desc(), pd.impl_info_str()};
    } else {
      dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, s.src_any, s.weights_any,
                                                 s.dst_any, s.strides, s.padding, s.padding);
      dnnl::convolution_backward_weights::primitive_desc pd(d, Attr(), Engine(), hint);
      // operands: src, diff_dst; result: diff_weights
      conv = {dnnl::convolution_backward_weights(pd), pd.src_desc(), pd.diff_dst_desc(), pd.diff_weights_desc(),
              s.src, s.dst, s.weights, DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS,
              pd.scratchpad_desc(), pd.impl_info_str()};
    }
  }
  if (conv.impl.rfind("ref", 0) == 0) {
    throw std::runtime_error("only oneDNN's reference implementation: " + conv.impl);
  }
  return cache.emplace(key, std::move(conv)).first->second;
}

// `user` (NHWC/HWIO, at `data`) as the primitive's layout `want`: itself where they agree, else a reordered copy.
memory Input(const memory::desc& user, const memory::desc& want, void* data, dnnl::stream& stream) {
  memory given(user, Engine(), data);
  if (user == want) return given;
  memory copy(want, Engine());
  dnnl::reorder(given, copy).execute(stream, given, copy);
  return copy;
}

ffi::Error Run(int pass, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::ResultBuffer<ffi::F32> out, int64_t padding) {
  const bool bf16 = a.element_type() == ffi::DataType::BF16;
  if (a.element_type() != b.element_type() || (!bf16 && a.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("jaxvgg onednn conv: operands must both be float32 or both bfloat16");
  }
  auto da = a.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (da.size() != 4 || db.size() != 4 || dout.size() != 4) {
    return ffi::Error::InvalidArgument("jaxvgg onednn conv: 4-d operands only");
  }
  // the shapes of (x: NHWC, kernel: HWIO) from each pass's operands and result
  const auto& x = pass == kBackwardData ? dout : da;
  const auto& k = pass == kBackwardWeights ? dout : db;
  const Key key{pass, bf16, x[0], x[1], x[2], x[3], k[3], k[0], k[1], padding};
  // one call at a time: each already runs on every core (oneDNN's OpenMP team), and XLA runs independent
  // custom calls (a layer's two gradients) on two of its threads at once
  static std::mutex running;
  std::lock_guard<std::mutex> one_at_a_time(running);
  try {
    const Conv& conv = Lookup(key);
    dnnl::stream stream(Engine());
    memory ma = Input(conv.user_a, conv.a, a.untyped_data(), stream);
    memory mb = Input(conv.user_b, conv.b, b.untyped_data(), stream);
    memory user_result(conv.user_result, Engine(), out->untyped_data());
    const bool reorder_result = !(conv.user_result == conv.result);
    memory result = reorder_result ? memory(conv.result, Engine()) : user_result;
    memory scratchpad(conv.scratchpad, Engine());
    conv.primitive.execute(stream, {{conv.arg_a, ma}, {conv.arg_b, mb}, {conv.arg_result, result},
                                    {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (reorder_result) dnnl::reorder(result, user_result).execute(stream, result, user_result);
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxvgg onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::ResultBuffer<ffi::F32> y, int64_t padding) {
  return Run(kForward, x, kernel, y, padding);
}
ffi::Error BackwardData(ffi::AnyBuffer g, ffi::AnyBuffer kernel, ffi::ResultBuffer<ffi::F32> dx, int64_t padding) {
  return Run(kBackwardData, g, kernel, dx, padding);
}
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::ResultBuffer<ffi::F32> dk, int64_t padding) {
  return Run(kBackwardWeights, x, g, dk, padding);
}

}  // namespace

// Which implementation oneDNN picks for a pass (0 forward, 1 backward-data, 2 backward-weights) of a shape,
// written into `out` (NUL-terminated, at most `size` bytes); returns 0, or -1 where it has none (`out` then
// says why). Lets Python probe, once, whether this CPU has oneDNN kernels for a dtype.
extern "C" int JaxvggConvImpl(int pass, int bf16, int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout,
                              int64_t kh, int64_t kw, int64_t padding, char* out, int64_t size) {
  std::string text;
  int rc = 0;
  try {
    text = Lookup(Key{pass, bf16 != 0, n, h, w, cin, cout, kh, kw, padding}).impl;
  } catch (const std::exception& e) {
    text = e.what();
    rc = -1;
  }
  if (size > 0) {
    const size_t len = std::min<size_t>(text.size(), static_cast<size_t>(size - 1));
    text.copy(out, len);
    out[len] = '\0';
  }
  return rc;
}

#define JAXVGG_CONV_HANDLER(name, fn)                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                             \
                                ffi::Ffi::Bind()                                      \
                                    .Arg<ffi::AnyBuffer>()                            \
                                    .Arg<ffi::AnyBuffer>()                            \
                                    .Ret<ffi::Buffer<ffi::F32>>()                     \
                                    .Attr<int64_t>("padding"));

JAXVGG_CONV_HANDLER(JaxvggConvForward, Forward)
JAXVGG_CONV_HANDLER(JaxvggConvBackwardData, BackwardData)
JAXVGG_CONV_HANDLER(JaxvggConvBackwardWeights, BackwardWeights)
