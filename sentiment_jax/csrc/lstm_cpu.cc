// The LSTM recurrence on CPU as two XLA FFI custom calls: the forward steps and their gradient.
//
// Only the sequential part lives here: per step, z = xp_t + b + h @ W_h, the gates, the masked carry
// (forward), and the gate cotangents dz_t with dh = dz_t @ W_h^T (backward). The large matmuls over
// all steps (x @ W_x, [x, h]^T @ dz, dz @ W_x^T) stay in XLA. The scan in recurrent.py computes the
// same and is what this is tested against.
//
// Layouts are time-major and row-major: xp, gates, dz [T, B, 4H]; bias [4H]; hs, cs, d_outputs [T, B, H];
// mask [T, B]; w [H, 4H] (forward) or w^T [4H, H] (backward). Gate order i, f, g, o.
// Everything is float32. Built with -march=native on the machine that runs it (cpu_kernels.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kVecs = 4;    // vectors per micro-tile row: 4 rows x 4 vectors = 16 accumulators
#else
constexpr int kLanes = 8;
constexpr int kVecs = 2;    // 16 ymm registers: 8 accumulators, 2 weights, 1 broadcast
#endif
constexpr int kRows = 4;
constexpr int kPanel = kLanes * kVecs;  // columns per packed weight panel

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

// W [K, N] row-major -> panels [N / kPanel][K][kPanel], so the micro-kernel streams contiguously.
std::vector<float> Pack(const float* w, int64_t k, int64_t n) {
  std::vector<float> packed(k * n);
  for (int64_t p = 0; p < n / kPanel; ++p)
    for (int64_t r = 0; r < k; ++r)
      std::memcpy(&packed[(p * k + r) * kPanel], w + r * n + p * kPanel, kPanel * sizeof(float));
  return packed;
}

// c[R, kPanel] += a[R, K] @ panel[K, kPanel], accumulators in registers.
template <int R>
inline void MicroTile(const float* a, int64_t k, const float* panel, float* c, int64_t ldc) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = *reinterpret_cast<const Vec*>(c + r * ldc + v * kLanes);
  for (int64_t i = 0; i < k; ++i) {
    Vec w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = *reinterpret_cast<const Vec*>(panel + i * kPanel + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * k + i];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) *reinterpret_cast<Vec*>(c + r * ldc + v * kLanes) = acc[r][v];
}

// c[M, N] += a[M, K] @ W[K, N]; W packed by Pack when N is a multiple of kPanel, else row-major.
void MatMulAcc(const float* a, int64_t m, int64_t k, const float* w, bool packed, int64_t n, float* c) {
  if (!packed) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) {
        const float s = a[r * k + i];
        const float* wr = w + i * n;
        float* cr = c + r * n;
        for (int64_t j = 0; j < n; ++j) cr[j] += s * wr[j];
      }
    return;
  }
  for (int64_t p = 0; p < n / kPanel; ++p) {
    const float* panel = w + p * k * kPanel;
    int64_t r = 0;
    for (; r + kRows <= m; r += kRows) MicroTile<kRows>(a + r * k, k, panel, c + r * n + p * kPanel, n);
    for (; r < m; ++r) MicroTile<1>(a + r * k, k, panel, c + r * n + p * kPanel, n);
  }
}

// exp(x) without a libm call, so the gate loops vectorise: 2^n * e^r, |r| <= ln2 / 2, with a
// degree-6 polynomial (Cephes' expf coefficients), about 1 ulp. NaN passes through.
inline float Exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }
inline float Tanh(float x) { return 2.0f * Sigmoid(2.0f * x) - 1.0f; }

inline void AddBias(const float* __restrict x, const float* __restrict bias, int64_t n, float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] + bias[j];
}

// One row's new cell state and output from its activated gates g [4H] and previous cell state.
inline void CellUpdate(const float* __restrict g, const float* __restrict c_prev, int64_t hidden,
                       float* __restrict c, float* __restrict h) {
  const float *gi = g, *gf = g + hidden, *gg = g + 2 * hidden, *go = g + 3 * hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    c[j] = gf[j] * c_prev[j] + gi[j] * gg[j];
    h[j] = go[j] * Tanh(c[j]);
  }
}

// One real (unpadded) row's gate cotangents dz [4H]; dh, dc [H] come in as the cotangents of the
// carry after the step and dc leaves as that of the carry before it (dh's recurrent part is the matmul).
inline void CellGradient(const float* __restrict g, const float* __restrict c, const float* __restrict c_prev,
                         const float* __restrict d_out, int64_t hidden, const float* __restrict dh,
                         float* __restrict dc, float* __restrict dz) {
  const float *gi = g, *gf = g + hidden, *gg = g + 2 * hidden, *go = g + 3 * hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    const float dh_step = dh[j] + d_out[j];
    const float tanh_c = Tanh(c[j]);
    const float dc_new = dc[j] + dh_step * go[j] * (1.0f - tanh_c * tanh_c);
    dz[j] = dc_new * gg[j] * gi[j] * (1.0f - gi[j]);
    dz[hidden + j] = dc_new * c_prev[j] * gf[j] * (1.0f - gf[j]);
    dz[2 * hidden + j] = dc_new * gi[j] * (1.0f - gg[j] * gg[j]);
    dz[3 * hidden + j] = dh_step * tanh_c * go[j] * (1.0f - go[j]);
    dc[j] = dc_new * gf[j];
  }
}

struct Shape {
  int64_t steps, batch, hidden;
};

// Step index of the i-th step in scan order.
inline int64_t StepAt(int64_t i, int64_t steps, bool reverse) { return reverse ? steps - 1 - i : i; }

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> gates, bool reverse) {
  const auto dims = xp.dimensions();
  if (dims.size() != 3 || w_h.dimensions().size() != 2 || w_h.dimensions()[1] != dims[2] ||
      dims[2] != 4 * w_h.dimensions()[0] || bias.element_count() != dims[2])
    return ffi::Error::InvalidArgument("lstm_forward: expected xp [T, B, 4H], bias [4H] and w_h [H, 4H]");
  const Shape s{dims[0], dims[1], w_h.dimensions()[0]};
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const bool packed = h4 % kPanel == 0;
  const std::vector<float> w = packed ? Pack(w_h.typed_data(), s.hidden, h4)
                                      : std::vector<float>(w_h.typed_data(), w_h.typed_data() + s.hidden * h4);
  const std::vector<float> zeros(bh, 0.0f);
  const float* x = xp.typed_data();
  const bool* m = mask.typed_data();
  float* h_all = hs->typed_data();
  float* c_all = cs->typed_data();
  float* g_all = gates->typed_data();
  for (int64_t i = 0; i < s.steps; ++i) {
    const int64_t t = StepAt(i, s.steps, reverse);
    const float* h_prev = i ? h_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
    const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
    float* g = g_all + t * bh4;
    for (int64_t b = 0; b < s.batch; ++b) AddBias(x + t * bh4 + b * h4, bias.typed_data(), h4, g + b * h4);
    MatMulAcc(h_prev, s.batch, s.hidden, w.data(), packed, h4, g);
    for (int64_t b = 0; b < s.batch; ++b) {
      float* gb = g + b * h4;
      const float* hp = h_prev + b * s.hidden;
      const float* cp = c_prev + b * s.hidden;
      float* hb = h_all + t * bh + b * s.hidden;
      float* cb = c_all + t * bh + b * s.hidden;
      for (int64_t j = 0; j < 2 * s.hidden; ++j) gb[j] = Sigmoid(gb[j]);
      for (int64_t j = 2 * s.hidden; j < 3 * s.hidden; ++j) gb[j] = Tanh(gb[j]);
      for (int64_t j = 3 * s.hidden; j < h4; ++j) gb[j] = Sigmoid(gb[j]);
      if (m[t * s.batch + b]) {
        CellUpdate(gb, cp, s.hidden, cb, hb);
      } else {
        std::memcpy(hb, hp, s.hidden * sizeof(float));
        std::memcpy(cb, cp, s.hidden * sizeof(float));
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> d_outputs,
                            ffi::Buffer<ffi::F32> d_final, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> w_t,
                            ffi::ResultBuffer<ffi::F32> dz_out, bool reverse) {
  const auto dims = cs.dimensions();
  if (dims.size() != 3 || w_t.dimensions().size() != 2 || w_t.dimensions()[0] != 4 * dims[2] ||
      w_t.dimensions()[1] != dims[2])
    return ffi::Error::InvalidArgument("lstm_backward: expected cs [T, B, H] and w_t [4H, H]");
  const Shape s{dims[0], dims[1], dims[2]};
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const bool packed = s.hidden % kPanel == 0;
  const std::vector<float> w = packed ? Pack(w_t.typed_data(), h4, s.hidden)
                                      : std::vector<float>(w_t.typed_data(), w_t.typed_data() + h4 * s.hidden);
  const std::vector<float> zeros(bh, 0.0f);
  std::vector<float> dh(d_final.typed_data(), d_final.typed_data() + bh), dc(bh, 0.0f);
  std::vector<float> dh_next(bh);
  const float* g_all = gates.typed_data();
  const float* c_all = cs.typed_data();
  const float* do_all = d_outputs.typed_data();
  const bool* m = mask.typed_data();
  float* dz_all = dz_out->typed_data();
  for (int64_t i = s.steps - 1; i >= 0; --i) {  // scan order, backwards
    const int64_t t = StepAt(i, s.steps, reverse);
    const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
    float* dz = dz_all + t * bh4;
    for (int64_t b = 0; b < s.batch; ++b) {
      float* dzb = dz + b * h4;
      float* dhb = dh.data() + b * s.hidden;
      float* dcb = dc.data() + b * s.hidden;
      float* dhn = dh_next.data() + b * s.hidden;
      if (!m[t * s.batch + b]) {  // a padded step passes both cotangents through and has no gradient
        std::memset(dzb, 0, h4 * sizeof(float));
        std::memcpy(dhn, dhb, s.hidden * sizeof(float));
        continue;
      }
      CellGradient(g_all + t * bh4 + b * h4, c_all + t * bh + b * s.hidden, c_prev + b * s.hidden,
                   do_all + t * bh + b * s.hidden, s.hidden, dhb, dcb, dzb);
      std::memset(dhn, 0, s.hidden * sizeof(float));
    }
    MatMulAcc(dz, s.batch, h4, w.data(), packed, s.hidden, dh_next.data());
    dh.swap(dh_next);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xp
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gates
                                  .Attr<bool>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_outputs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_final
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h^T
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz
                                  .Attr<bool>("reverse"));
