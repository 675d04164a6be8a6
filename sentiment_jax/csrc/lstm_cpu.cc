// The LSTM recurrence on CPU as two XLA FFI custom calls: the forward steps and their gradient.
//
// Only the sequential part lives here: per step, z = xp_t + b + h @ W_h, the gates, the masked carry
// (forward), and the gate cotangents dz_t with dh = dz_t @ W_h^T (backward). The large matmuls over
// all steps (x @ W_x, [x, h]^T @ dz, dz @ W_x^T) stay in XLA. The scan in recurrent.py computes the
// same and is what this is tested against.
//
// Layouts are time-major and row-major: xp, gates, dz [T, B, 4H]; bias [4H]; hs, cs, d_outputs [T, B, H];
// mask [T, B]; w [H, 4H] (forward) or w^T [4H, H] (backward). Gate order i, f, g, o.
// Arrays are float32; with `bfloat16` the per-step matmul runs on AMX bfloat16 tiles where the CPU has
// them (float32 sums), as the scan's bfloat16 matmuls round their operands. Built with -march=native on
// the machine that runs it (cpu_kernels.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// c[R, kPanel] += a[R, k] @ panel[k, kPanel] (rows of a lda apart), accumulators in registers.
template <int R>
inline void MicroTile(const float* a, int64_t lda, int64_t k, const float* panel, float* c, int64_t ldc) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = *reinterpret_cast<const Vec*>(c + r * ldc + v * kLanes);
  for (int64_t i = 0; i < k; ++i) {
    Vec w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = *reinterpret_cast<const Vec*>(panel + i * kPanel + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + i];
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
  // K in blocks of kDepth rows of the panel (32 KB of float32 at 64 columns), which stay in L1 while
  // every row block of a passes over them.
  constexpr int64_t kDepth = 128;
  for (int64_t p = 0; p < n / kPanel; ++p)
    for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
      const float* panel = w + (p * k + k0) * kPanel;
      const int64_t depth = std::min(kDepth, k - k0);
      int64_t r = 0;
      for (; r + kRows <= m; r += kRows) MicroTile<kRows>(a + r * k + k0, k, depth, panel, c + r * n + p * kPanel, n);
      for (; r < m; ++r) MicroTile<1>(a + r * k + k0, k, depth, panel, c + r * n + p * kPanel, n);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX: bfloat16 tile matmuls with float32 sums, for bfloat16 models on CPUs that have them. Tiles are
// 16 rows of 64 bytes: a [16, 32] bfloat16, w [32, 16] as 16 rows of bfloat16 pairs, c [16, 16] float32.

// The kernel asks Linux once per process for the AMX tile state.
bool AmxUsable() {
  static const bool usable = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return usable;
}

inline uint16_t ToBf16(float x) {  // round to nearest even, as the hardware conversion does
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

class AmxMatMul {
 public:
  // Usable for a[M, K] @ w[K, N] when K and N are multiples of 32 (M: of 16, checked per call).
  static bool Fits(int64_t k, int64_t n) { return k % 32 == 0 && n % 32 == 0 && AmxUsable(); }

  AmxMatMul(const float* w, int64_t k, int64_t n) : k_(k), n_(n), tiles_(k * n / 2) {
    for (int64_t nc = 0; nc < n / 16; ++nc)
      for (int64_t kc = 0; kc < k / 32; ++kc)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t row = kc * 32 + 2 * r, col = nc * 16 + j;
            tiles_[((nc * (k / 32) + kc) * 16 + r) * 16 + j] =
                ToBf16(w[row * n + col]) | static_cast<uint32_t>(ToBf16(w[(row + 1) * n + col])) << 16;
          }
    for (int t = 0; t < 8; ++t) config_.colsb[t] = 64, config_.rows[t] = 16;
  }

  // c[M, N] += a[M, K] @ w for M a multiple of 16: tiles 0-1 hold a 16 x 32 block of c, 4 a row block
  // of a, 6-7 two column blocks of w. `scratch` holds a in bfloat16 (one per thread).
  void MulAcc(const float* a, int64_t m, float* c, std::vector<uint16_t>& scratch) const {
    scratch.resize(m * k_);
    for (int64_t i = 0; i < m * k_; ++i) scratch[i] = ToBf16(a[i]);
    _tile_loadconfig(&config_);
    const int64_t ldc = n_ * sizeof(float), lda = k_ * sizeof(uint16_t);
    for (int64_t n0 = 0; n0 < n_; n0 += 32)
      for (int64_t m0 = 0; m0 < m; m0 += 16) {
        float* c0 = c + m0 * n_ + n0;
        _tile_loadd(0, c0, ldc);
        _tile_loadd(1, c0 + 16, ldc);
        for (int64_t k0 = 0; k0 < k_; k0 += 32) {
          _tile_loadd(4, &scratch[m0 * k_ + k0], lda);
          _tile_loadd(6, &tiles_[((n0 / 16) * (k_ / 32) + k0 / 32) * 256], 64);
          _tile_loadd(7, &tiles_[((n0 / 16 + 1) * (k_ / 32) + k0 / 32) * 256], 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
        }
        _tile_stored(0, c0, ldc);
        _tile_stored(1, c0 + 16, ldc);
      }
    _tile_release();
  }

 private:
  int64_t k_, n_;
  std::vector<uint32_t> tiles_;
  TileConfig config_;
};
#endif

// The per-step c[M, N] += a[M, K] @ W[K, N] with W fixed over the steps: AMX bfloat16 tiles for a
// bfloat16 model where the CPU has them (a rounded to bfloat16 as the scan's bfloat16 matmuls do),
// else float32, W packed into panels where N allows.
class StepMatMul {
 public:
  StepMatMul(const float* w, int64_t k, int64_t n, bool bf16)
      : k_(k), n_(n), packed_(n % kPanel == 0), w_(packed_ ? Pack(w, k, n) : std::vector<float>(w, w + k * n)) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (bf16 && AmxMatMul::Fits(k, n)) amx_ = std::make_unique<AmxMatMul>(w, k, n);
#endif
  }

  // Thread-safe; `scratch` is the calling thread's own.
  void MulAcc(const float* a, int64_t m, float* c, std::vector<uint16_t>& scratch) const {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_ && m % 16 == 0) return amx_->MulAcc(a, m, c, scratch);
#endif
    MatMulAcc(a, m, k_, w_.data(), packed_, n_, c);
  }

 private:
  int64_t k_, n_;
  bool packed_;
  std::vector<float> w_;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  std::unique_ptr<AmxMatMul> amx_;
#endif
};

// Runs body(first, last) on `threads` ranges of the rows at once: an LSTM's rows never interact, so each
// thread takes its rows through every step without waiting for the others. Ranges are multiples of 16
// rows where the rows allow, as the AMX tiles want.
template <typename Body>
void ParallelRows(int64_t rows, int64_t threads, Body&& body) {
  int64_t chunk = (rows + std::max<int64_t>(threads, 1) - 1) / std::max<int64_t>(threads, 1);
  if (rows % 16 == 0) chunk = (chunk + 15) / 16 * 16;
  std::vector<std::thread> pool;
  for (int64_t first = chunk; first < rows; first += chunk)
    pool.emplace_back([&body, first, last = std::min(rows, first + chunk)] { body(first, last); });
  body(0, std::min(rows, chunk));
  for (auto& t : pool) t.join();
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
                           ffi::ResultBuffer<ffi::F32> gates, bool reverse, bool bf16,
                           int64_t threads) {
  const auto dims = xp.dimensions();
  if (dims.size() != 3 || w_h.dimensions().size() != 2 || w_h.dimensions()[1] != dims[2] ||
      dims[2] != 4 * w_h.dimensions()[0] || bias.element_count() != dims[2])
    return ffi::Error::InvalidArgument("lstm_forward: expected xp [T, B, 4H], bias [4H] and w_h [H, 4H]");
  const Shape s{dims[0], dims[1], w_h.dimensions()[0]};
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const StepMatMul w(w_h.typed_data(), s.hidden, h4, bf16);
  const std::vector<float> zeros(bh, 0.0f);
  const float* x = xp.typed_data();
  const bool* m = mask.typed_data();
  float* h_all = hs->typed_data();
  float* c_all = cs->typed_data();
  float* g_all = gates->typed_data();
  ParallelRows(s.batch, threads, [&](int64_t first, int64_t last) {
    std::vector<uint16_t> scratch;
    for (int64_t i = 0; i < s.steps; ++i) {
      const int64_t t = StepAt(i, s.steps, reverse);
      const float* h_prev = i ? h_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
      const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
      float* g = g_all + t * bh4;
      for (int64_t b = first; b < last; ++b) AddBias(x + t * bh4 + b * h4, bias.typed_data(), h4, g + b * h4);
      w.MulAcc(h_prev + first * s.hidden, last - first, g + first * h4, scratch);
      for (int64_t b = first; b < last; ++b) {
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
  });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> d_outputs,
                            ffi::Buffer<ffi::F32> d_final, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> w_t,
                            ffi::ResultBuffer<ffi::F32> dz_out, bool reverse, bool bf16,
                            int64_t threads) {
  const auto dims = cs.dimensions();
  if (dims.size() != 3 || w_t.dimensions().size() != 2 || w_t.dimensions()[0] != 4 * dims[2] ||
      w_t.dimensions()[1] != dims[2])
    return ffi::Error::InvalidArgument("lstm_backward: expected cs [T, B, H] and w_t [4H, H]");
  const Shape s{dims[0], dims[1], dims[2]};
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const StepMatMul w(w_t.typed_data(), h4, s.hidden, bf16);
  const std::vector<float> zeros(bh, 0.0f);
  const float* g_all = gates.typed_data();
  const float* c_all = cs.typed_data();
  const float* do_all = d_outputs.typed_data();
  const bool* m = mask.typed_data();
  float* dz_all = dz_out->typed_data();
  ParallelRows(s.batch, threads, [&](int64_t first, int64_t last) {
    const int64_t rows = last - first;
    std::vector<float> dh(d_final.typed_data() + first * s.hidden, d_final.typed_data() + last * s.hidden);
    std::vector<float> dc(rows * s.hidden, 0.0f), dh_next(rows * s.hidden);
    std::vector<uint16_t> scratch;
    for (int64_t i = s.steps - 1; i >= 0; --i) {  // scan order, backwards
      const int64_t t = StepAt(i, s.steps, reverse);
      const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
      float* dz = dz_all + t * bh4;
      for (int64_t b = first; b < last; ++b) {
        float* dzb = dz + b * h4;
        float* dhb = dh.data() + (b - first) * s.hidden;
        float* dcb = dc.data() + (b - first) * s.hidden;
        float* dhn = dh_next.data() + (b - first) * s.hidden;
        if (!m[t * s.batch + b]) {  // a padded step passes both cotangents through and has no gradient
          std::memset(dzb, 0, h4 * sizeof(float));
          std::memcpy(dhn, dhb, s.hidden * sizeof(float));
          continue;
        }
        CellGradient(g_all + t * bh4 + b * h4, c_all + t * bh + b * s.hidden, c_prev + b * s.hidden,
                     do_all + t * bh + b * s.hidden, s.hidden, dhb, dcb, dzb);
        std::memset(dhn, 0, s.hidden * sizeof(float));
      }
      w.MulAcc(dz + first * h4, rows, dh_next.data(), scratch);
      dh.swap(dh_next);
    }
  });
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
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("bfloat16")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_outputs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_final
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h^T
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("bfloat16")
                                  .Attr<int64_t>("threads"));
