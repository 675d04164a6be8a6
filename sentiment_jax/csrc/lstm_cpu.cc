// The LSTM recurrence on CPU as two XLA FFI custom calls: the forward steps and their gradient.
//
// Only the sequential part lives here: per step, z = b + x_t @ W_x + h @ W_h, the gates and the masked
// carry (forward), and the gate cotangents dz_t with dh = dz_t @ W_h^T (backward). The large matmuls
// over all steps of the gradient (x^T @ dz, h_prev^T @ dz, dz @ W_x^T) stay in XLA, and so may the
// input projection x @ W_x (`projected`: x is then xp [T, B, 4H]). The scan in
// recurrent.py computes the same and is what this is tested against.
//
// Layouts are time-major and row-major: x [T, B, E]; gates, dz [T, B, 4H]; bias, d_bias [4H]; outputs,
// h_prev, cs, d_outputs [T, B, H]; final [B, H]; mask [T, B]; w_x [E, 4H], w_h [H, 4H] (forward) or
// w_h^T [4H, H] (backward). Gate order i, f, g, o. The carries, gates and sums are float32. x and the
// arrays the large matmuls read (outputs, h_prev, dz, d_outputs) come in the model's matmul dtype,
// float32 or bfloat16, so that XLA converts nothing between the kernel and its matmuls. With bfloat16
// the per-step matmuls run on AMX bfloat16 tiles where the CPU has them (float32 sums), as the scan's
// bfloat16 matmuls round their operands. Built with -march=native on the machine that runs it
// (cpu_kernels.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <thread>
#include <type_traits>
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

// bfloat16 is stored as the upper 16 bits of a float32 (uint16_t, as XLA's FFI hands it over).
using Bf16 = uint16_t;

inline Bf16 ToBf16(float x) {  // round to nearest even, as XLA's conversion does; NaN stays NaN
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<Bf16>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

inline float ToFloat(Bf16 x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16); }

template <typename T> inline T FromFloat(float x);
template <> inline float FromFloat<float>(float x) { return x; }
template <> inline Bf16 FromFloat<Bf16>(float x) { return ToBf16(x); }

// n floats of T (float32 or bfloat16) as float32: `from` itself where T is float32, else `scratch`
// holding it converted.
template <typename T>
inline const float* AsFloat(const T* from, int64_t n, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return from;
  } else {
    scratch.resize(n);
    for (int64_t j = 0; j < n; ++j) scratch[j] = ToFloat(from[j]);
    return scratch.data();
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

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// w [K, N] (K and N multiples of 32) as AMX weight tiles, 16 rows of bfloat16 pairs each.
class AmxWeights {
 public:
  static bool Fits(int64_t k, int64_t n) { return k % 32 == 0 && n % 32 == 0 && AmxUsable(); }

  AmxWeights(const float* w, int64_t k, int64_t n) : k_(k), tiles_(k * n / 2) {
    for (int64_t nc = 0; nc < n / 16; ++nc)
      for (int64_t kc = 0; kc < k / 32; ++kc)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t row = kc * 32 + 2 * r, col = nc * 16 + j;
            tiles_[((nc * (k / 32) + kc) * 16 + r) * 16 + j] =
                ToBf16(w[row * n + col]) | static_cast<uint32_t>(ToBf16(w[(row + 1) * n + col])) << 16;
          }
  }

  int64_t k() const { return k_; }
  // The tile of rows [32 kc, 32 kc + 32) and columns [16 nc, 16 nc + 16).
  const uint32_t* Tile(int64_t nc, int64_t kc) const { return &tiles_[(nc * (k_ / 32) + kc) * 256]; }

 private:
  int64_t k_;
  std::vector<uint32_t> tiles_;
};

struct AmxSource {
  const Bf16* a;  // [M, K], rows K apart
  const AmxWeights* w;
};

// c[M, N] (+)= the sum over sources of a @ w, for M a multiple of 16: c's old values are added where
// `accumulate`, else overwritten. Each 32 x 32 block of c stays in tiles 0-3 over every source's K;
// tiles 4-5 hold two row blocks of a, 6-7 two column blocks of w.
void AmxMulAcc(std::initializer_list<AmxSource> sources, int64_t m, int64_t n, float* c, bool accumulate) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  const int64_t ldc = n * sizeof(float);
  for (int64_t n0 = 0; n0 < n; n0 += 32)
    for (int64_t m0 = 0; m0 < m; m0 += 32) {
      const bool two = m0 + 32 <= m;  // else the last 16 rows
      float* c0 = c + m0 * n + n0;
      if (accumulate) {
        _tile_loadd(0, c0, ldc);
        _tile_loadd(1, c0 + 16, ldc);
        if (two) {  // else past the last row
          _tile_loadd(2, c0 + 16 * n, ldc);
          _tile_loadd(3, c0 + 16 * n + 16, ldc);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (const AmxSource& s : sources) {
        const int64_t k = s.w->k(), lda = k * sizeof(Bf16);
        for (int64_t k0 = 0; k0 < k; k0 += 32) {
          _tile_loadd(4, s.a + m0 * k + k0, lda);
          _tile_loadd(6, s.w->Tile(n0 / 16, k0 / 32), 64);
          _tile_loadd(7, s.w->Tile(n0 / 16 + 1, k0 / 32), 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, s.a + (m0 + 16) * k + k0, lda);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, c0, ldc);
      _tile_stored(1, c0 + 16, ldc);
      if (two) {
        _tile_stored(2, c0 + 16 * n, ldc);
        _tile_stored(3, c0 + 16 * n + 16, ldc);
      }
    }
  _tile_release();
}
#endif

// A per-step c[M, N] += a[M, K] @ W[K, N] with W fixed over the steps, rows of a K apart: a in
// bfloat16 on AMX tiles where the CPU has them, else in float32 with W packed into panels where N allows.
class StepMatMul {
 public:
  StepMatMul(const float* w, int64_t k, int64_t n, bool bf16)
      : k_(k), n_(n), packed_(n % kPanel == 0), w_(packed_ ? Pack(w, k, n) : std::vector<float>(w, w + k * n)) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (bf16 && AmxWeights::Fits(k, n)) amx_ = std::make_unique<AmxWeights>(w, k, n);
#endif
  }

  // Thread-safe; `scratch` is the calling thread's own.
  void MulAcc(const float* a, int64_t m, float* c, std::vector<float>&) const {
    MatMulAcc(a, m, k_, w_.data(), packed_, n_, c);
  }

  void MulAcc(const Bf16* a, int64_t m, float* c, std::vector<float>& scratch) const {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_ && m % 16 == 0) return AmxMulAcc({{a, amx_.get()}}, m, n_, c, true);
#endif
    MatMulAcc(AsFloat(a, m * k_, scratch), m, k_, w_.data(), packed_, n_, c);
  }

  // c = a1 @ w1 + a2 @ w2, in one pass over c where both take AMX tiles.
  template <typename T>
  static void Mul2(const StepMatMul& w1, const T* a1, const StepMatMul& w2, const T* a2, int64_t m, float* c,
                   std::vector<float>& scratch) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if constexpr (std::is_same_v<T, Bf16>)
      if (w1.amx_ && w2.amx_ && m % 16 == 0)
        return AmxMulAcc({{a1, w1.amx_.get()}, {a2, w2.amx_.get()}}, m, w1.n_, c, false);
#endif
    std::memset(c, 0, m * w1.n_ * sizeof(float));
    w1.MulAcc(a1, m, c, scratch);
    w2.MulAcc(a2, m, c, scratch);
  }

 private:
  int64_t k_, n_;
  bool packed_;
  std::vector<float> w_;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  std::unique_ptr<AmxWeights> amx_;
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

// One real row's step: new cell state c and carry h (updated in place) from its activated gates
// g [4H] and previous cell state, and the step's output (h in the output's dtype).
template <typename T>
inline void CellUpdate(const float* __restrict g, const float* __restrict c_prev, int64_t hidden,
                       float* __restrict c, float* __restrict h, T* __restrict out) {
  const float *gi = g, *gf = g + hidden, *gg = g + 2 * hidden, *go = g + 3 * hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    c[j] = gf[j] * c_prev[j] + gi[j] * gg[j];
    h[j] = go[j] * Tanh(c[j]);
    out[j] = FromFloat<T>(h[j]);
  }
}

// One real (unpadded) row's gate cotangents dz [4H]; dh, dc [H] come in as the cotangents of the carry
// after the step and dc leaves as that of the carry before it (dh's recurrent part is the matmul).
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

// A float32 row into its place in T: a bfloat16 copy, or nothing where T is float32 and the row was
// computed in place.
template <typename T>
inline void Store(const float* __restrict from, int64_t n, T* __restrict to) {
  if constexpr (!std::is_same_v<T, float>)
    for (int64_t j = 0; j < n; ++j) to[j] = FromFloat<T>(from[j]);
}

inline void Accumulate(const float* __restrict x, int64_t n, float* __restrict sum) {
  for (int64_t j = 0; j < n; ++j) sum[j] += x[j];
}

struct Shape {
  int64_t steps, batch, hidden, inputs;
};

// Step index of the i-th step in scan order.
inline int64_t StepAt(int64_t i, int64_t steps, bool reverse) { return reverse ? steps - 1 - i : i; }

// T: the dtype of x, outputs and h_prev (float32 or bfloat16). Either x [T, B, E] with its StepMatMul
// w_x, or xp [T, B, 4H], the input projection already made (x and w_x then unused).
template <typename T>
void LstmForwardSteps(const T* x, const StepMatMul* w_x, const float* xp, const float* bias, const StepMatMul& w_h,
                      const bool* m, const Shape& s, bool reverse, int64_t threads, T* out_all, float* final,
                      T* hp_all, float* c_all, float* g_all) {
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const std::vector<float> zeros(bh, 0.0f);
  ParallelRows(s.batch, threads, [&](int64_t first, int64_t last) {
    const int64_t rows = last - first;
    std::vector<float> h(rows * s.hidden, 0.0f), scratch;  // this thread's rows' carry h
    for (int64_t i = 0; i < s.steps; ++i) {
      const int64_t t = StepAt(i, s.steps, reverse);
      const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
      T* hp = hp_all + t * bh + first * s.hidden;
      for (int64_t j = 0; j < rows * s.hidden; ++j) hp[j] = FromFloat<T>(h[j]);
      const auto* h_in = [&] {  // the per-step matmul's operand: bfloat16 as written, or float32 h
        if constexpr (std::is_same_v<T, Bf16>) return static_cast<const Bf16*>(hp);
        else return static_cast<const float*>(h.data());
      }();
      // z = x_t @ W_x + h @ W_h, the bias added with the activations below.
      float* g = g_all + t * bh4 + first * h4;
      if (xp) {
        std::memcpy(g, xp + (t * s.batch + first) * h4, rows * h4 * sizeof(float));
        w_h.MulAcc(h_in, rows, g, scratch);
      } else {
        StepMatMul::Mul2(*w_x, x + (t * s.batch + first) * s.inputs, w_h, h_in, rows, g, scratch);
      }
      for (int64_t b = first; b < last; ++b) {
        float* gb = g + (b - first) * h4;
        const float* cp = c_prev + b * s.hidden;
        float* cb = c_all + t * bh + b * s.hidden;
        T* ob = out_all + t * bh + b * s.hidden;
        for (int64_t j = 0; j < 2 * s.hidden; ++j) gb[j] = Sigmoid(gb[j] + bias[j]);
        for (int64_t j = 2 * s.hidden; j < 3 * s.hidden; ++j) gb[j] = Tanh(gb[j] + bias[j]);
        for (int64_t j = 3 * s.hidden; j < h4; ++j) gb[j] = Sigmoid(gb[j] + bias[j]);
        if (m[t * s.batch + b]) {
          CellUpdate(gb, cp, s.hidden, cb, h.data() + (b - first) * s.hidden, ob);
        } else {  // a padded step carries h and c through and outputs zeros
          std::memcpy(cb, cp, s.hidden * sizeof(float));
          std::memset(ob, 0, s.hidden * sizeof(T));
        }
      }
    }
    std::memcpy(final + first * s.hidden, h.data(), h.size() * sizeof(float));
  });
}

// T: the dtype of dz; D: that of d_outputs.
template <typename T, typename D>
void LstmBackwardSteps(const float* g_all, const float* c_all, const D* do_all, const float* d_final, const bool* m,
                       const StepMatMul& w, const Shape& s, bool reverse, int64_t threads, T* dz_all, float* d_bias) {
  const int64_t h4 = 4 * s.hidden, bh = s.batch * s.hidden, bh4 = s.batch * h4;
  const std::vector<float> zeros(bh, 0.0f);
  // Each row's own running sum of its dz, added up over rows in order at the end: the same bits
  // however the rows are split over threads.
  std::vector<float> row_bias(s.batch * h4, 0.0f);
  ParallelRows(s.batch, threads, [&](int64_t first, int64_t last) {
    const int64_t rows = last - first;
    std::vector<float> dh(d_final + first * s.hidden, d_final + last * s.hidden);
    std::vector<float> dc(rows * s.hidden, 0.0f), dh_next(rows * s.hidden), scratch, d_out_row, dz_row(h4);
    for (int64_t i = s.steps - 1; i >= 0; --i) {  // scan order, backwards
      const int64_t t = StepAt(i, s.steps, reverse);
      const float* c_prev = i ? c_all + StepAt(i - 1, s.steps, reverse) * bh : zeros.data();
      T* dz = dz_all + t * bh4;
      for (int64_t b = first; b < last; ++b) {
        T* dzb = dz + b * h4;
        float* dhb = dh.data() + (b - first) * s.hidden;
        float* dhn = dh_next.data() + (b - first) * s.hidden;
        if (!m[t * s.batch + b]) {  // a padded step passes both cotangents through and has no gradient
          std::memset(dzb, 0, h4 * sizeof(T));
          std::memcpy(dhn, dhb, s.hidden * sizeof(float));
          continue;
        }
        // dz in float32: in dz itself, or in a row converted to bfloat16 after.
        float* dz_f = std::is_same_v<T, float> ? reinterpret_cast<float*>(dzb) : dz_row.data();
        CellGradient(g_all + t * bh4 + b * h4, c_all + t * bh + b * s.hidden, c_prev + b * s.hidden,
                     AsFloat(do_all + t * bh + b * s.hidden, s.hidden, d_out_row), s.hidden, dhb,
                     dc.data() + (b - first) * s.hidden, dz_f);
        Store(dz_f, h4, dzb);
        Accumulate(dz_f, h4, row_bias.data() + b * h4);
        std::memset(dhn, 0, s.hidden * sizeof(float));
      }
      w.MulAcc(dz + first * h4, rows, dh_next.data(), scratch);
      dh.swap(dh_next);
    }
  });
  std::fill(d_bias, d_bias + h4, 0.0f);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t j = 0; j < h4; ++j) d_bias[j] += row_bias[b * h4 + j];
}

bool IsBf16(const ffi::AnyBuffer& a) { return a.element_type() == ffi::DataType::BF16; }
bool IsFloat(const ffi::AnyBuffer& a) { return IsBf16(a) || a.element_type() == ffi::DataType::F32; }

ffi::Error LstmForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> outputs,
                           ffi::ResultBuffer<ffi::F32> final, ffi::Result<ffi::AnyBuffer> h_prev,
                           ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> gates, bool projected,
                           bool reverse, int64_t threads) {
  const auto dims = x.dimensions();
  const auto hd = w_h.dimensions(), xd = w_x.dimensions();
  const char* expected =
      "lstm_forward: expected x [T, B, E] of the outputs' dtype with w_x [E, 4H] (or, projected, float32 "
      "x [T, B, 4H]), bias [4H], w_h [H, 4H], and outputs and h_prev of one float dtype";
  if (hd.size() != 2 || hd[1] != 4 * hd[0] || bias.element_count() != hd[1] || dims.size() != 3 ||
      !IsFloat(*outputs) || h_prev->element_type() != outputs->element_type())
    return ffi::Error::InvalidArgument(expected);
  const bool x_fits = projected ? x.element_type() == ffi::DataType::F32 && dims[2] == hd[1]
                                : x.element_type() == outputs->element_type() && xd.size() == 2 &&
                                      xd[0] == dims[2] && xd[1] == hd[1];
  if (!x_fits) return ffi::Error::InvalidArgument(expected);
  const Shape s{dims[0], dims[1], hd[0], dims[2]};
  const bool bf16 = IsBf16(*outputs);
  const StepMatMul wh(w_h.typed_data(), s.hidden, 4 * s.hidden, bf16);
  const std::unique_ptr<StepMatMul> wx(
      projected ? nullptr : new StepMatMul(w_x.typed_data(), s.inputs, 4 * s.hidden, bf16));
  const float* xp = projected ? x.typed_data<float>() : nullptr;
  if (bf16)
    LstmForwardSteps(projected ? nullptr : static_cast<const Bf16*>(x.untyped_data()), wx.get(), xp,
                     bias.typed_data(), wh, mask.typed_data(), s, reverse, threads,
                     static_cast<Bf16*>(outputs->untyped_data()), final->typed_data(),
                     static_cast<Bf16*>(h_prev->untyped_data()), cs->typed_data(), gates->typed_data());
  else
    LstmForwardSteps(projected ? nullptr : x.typed_data<float>(), wx.get(), xp, bias.typed_data(), wh,
                     mask.typed_data(), s, reverse, threads, outputs->typed_data<float>(), final->typed_data(),
                     h_prev->typed_data<float>(), cs->typed_data(), gates->typed_data());
  return ffi::Error::Success();
}

template <typename T>
void LstmBackwardAs(const ffi::AnyBuffer& d_outputs, const float* g, const float* c, const float* d_final,
                    const bool* m, const StepMatMul& w, const Shape& s, bool reverse, int64_t threads, T* dz,
                    float* d_bias) {
  if (IsBf16(d_outputs))
    LstmBackwardSteps(g, c, static_cast<const Bf16*>(d_outputs.untyped_data()), d_final, m, w, s, reverse, threads,
                      dz, d_bias);
  else
    LstmBackwardSteps(g, c, d_outputs.typed_data<float>(), d_final, m, w, s, reverse, threads, dz, d_bias);
}

ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs, ffi::AnyBuffer d_outputs,
                            ffi::Buffer<ffi::F32> d_final, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> w_t,
                            ffi::Result<ffi::AnyBuffer> dz, ffi::ResultBuffer<ffi::F32> d_bias, bool reverse,
                            int64_t threads) {
  const auto dims = cs.dimensions();
  if (dims.size() != 3 || w_t.dimensions().size() != 2 || w_t.dimensions()[0] != 4 * dims[2] ||
      w_t.dimensions()[1] != dims[2] || !IsFloat(*dz) || !IsFloat(d_outputs))
    return ffi::Error::InvalidArgument("lstm_backward: expected cs [T, B, H], w_t [4H, H] and float dz, d_outputs");
  const Shape s{dims[0], dims[1], dims[2], 0};
  const bool bf16 = IsBf16(*dz);
  const StepMatMul w(w_t.typed_data(), 4 * s.hidden, s.hidden, bf16);
  const float *g = gates.typed_data(), *c = cs.typed_data(), *d_f = d_final.typed_data();
  if (bf16)
    LstmBackwardAs(d_outputs, g, c, d_f, mask.typed_data(), w, s, reverse, threads,
                   static_cast<Bf16*>(dz->untyped_data()), d_bias->typed_data());
  else
    LstmBackwardAs(d_outputs, g, c, d_f, mask.typed_data(), w, s, reverse, threads, dz->typed_data<float>(),
                   d_bias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x, or xp where projected
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<ffi::AnyBuffer>()          // outputs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // final
                                  .Ret<ffi::AnyBuffer>()          // h_prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gates
                                  .Attr<bool>("projected")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cs
                                  .Arg<ffi::AnyBuffer>()          // d_outputs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_final
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h^T
                                  .Ret<ffi::AnyBuffer>()          // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_bias
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));
