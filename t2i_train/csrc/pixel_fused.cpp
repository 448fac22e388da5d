// Native CPU kernels of the fused per-pixel sub-blocks of the PiT block (see t2i_train/models/fused.py, whose
// Python chunk loops compute the same values with the same rounding points; that module documents the
// mathematics). Each kernel runs its rows in CHUNK-row chunks spread over ATen's intra-op threads (one
// contiguous range of chunks per thread, so the partial parameter-gradient sums, added in range order at the
// end, do not depend on scheduling). The elementwise work of a chunk is one pass per row in float32. At the
// released width (D_pix 16, MLP hidden 64) rows are single 16-float vectors and the pixel MLP runs in
// register tiles of 4 rows (below); other widths use per-channel loops and ATen calls for the chunk's small
// matmuls, run single-threaded inside the parallel region.
//
// Activations are float32, or bfloat16 under autocast (the compute dtype `cd`); parameters are float32.
// R(v) below is v rounded to `cd` (the identity in float32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

constexpr int64_t kChunk = 4096;

// Loads and stores between the activation dtype T and float32. The bfloat16 rounding is round-to-nearest-even
// (NaN kept quiet), as c10::BFloat16's, written without branches so that the channel loops vectorise.
inline float ld(float v) { return v; }
inline float ld(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}
inline uint32_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
}
// R(v): v rounded to T, as float. put(p, i, v): p[i] = v rounded to T. Both on raw bits, never through a T
// temporary: a struct temporary in a channel loop stops its vectorisation.
template <typename T>
inline float R(float v);
template <>
inline float R<float>(float v) { return v; }
template <>
inline float R<c10::BFloat16>(float v) { return __builtin_bit_cast(float, bf16_bits(v) << 16); }
inline void put(float* p, int64_t i, float v) { p[i] = v; }
inline void put(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bf16_bits(v));
}

// exp(x) for x <= 0 (Cephes expf: Cody-Waite reduction, degree-6 polynomial; relative error ~1e-7), written
// without calls or branches so that loops over it vectorise (built without -ffast-math: the rounding trick
// below must not be folded).
inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  // n = round(x·log2 e) by the 1.5·2²³ trick (exact for |n| < 2²², vectorises where floorf does not)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// The exact (erf) GELU of x and its derivative: gelu = x·Φ(x), gelu' = Φ(x) + x·φ(x), with erf by Abramowitz &
// Stegun 7.1.26 (|error| < 1.5e-7; the formula of ATen's vectorised erf). Φ and φ share one exp(-x²/2); inlined
// side by side the compiler computes it once (no references or aggregates, which would stop vectorisation).
inline float gelu_cdf(float x, float e) {
  const float t = 1.f / (1.f + 0.3275911f * 0.70710678118654752f * std::fabs(x));
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                      t * 1.061405429f))));
  const float erf_abs = 1.f - poly * e;
  return 0.5f * (1.f + (x < 0.f ? -erf_abs : erf_abs));
}
inline float gelu_exp(float x) { return exp_nonpos(-0.5f * x * x); }
inline float gelu(float x) { return x * gelu_cdf(x, gelu_exp(x)); }
inline float gelu_grad(float x, float cdf, float e) { return cdf + x * e * 0.39894228040143268f; }

// ---------------------------------------------------------------------------------------------------------------
// Register-tiled pixel MLP for the released width (D_pix 16, hidden 64): the chunk's 16→64→16 matmuls, GELU and
// their backward run in TR-row tiles held in registers and L1 instead of ATen GEMM calls, whose small inner
// dimension (16) and per-call set-up dominated. Written with GCC/Clang vector types (16 floats, one AVX-512
// register; split by the compiler where the CPU has narrower ones). Products and sums are float32, as in the
// GEMMs (bf16·bf16 products are exact in float32); the rounding points are those of the ATen path.
constexpr int kMD = 16, kMH = 64, kTR = 4;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2)));

inline v16 vld(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline v16 vld(const c10::BFloat16* p) {
  const h16v h = *reinterpret_cast<const h16u*>(p);
  return reinterpret_cast<v16>(__builtin_convertvector(h, u16v) << 16);
}
inline void vst(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 bc(float s) { return v16{} + s; }
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
// Σ v as ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)) with s_k = v_k + v_{k+8}, in registers
#if defined(__clang__) || __GNUC__ >= 12
inline float hsum(v16 v) {
  const v8 s = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 t = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  return (t[0] + t[1]) + (t[2] + t[3]);
}
#else  // no __builtin_shufflevector: the same sums through memory
inline float hsum(v16 v) {
  float a[16];
  vst(a, v);
  float s8[8];
  for (int k = 0; k < 8; ++k) s8[k] = a[k] + a[k + 8];
  return ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7]));
}
#endif

// R<T> on a vector, and a vector of T rounded values stored as float (a scratch row)
template <typename T>
inline v16 VR(v16 v);
template <>
inline v16 VR<float>(v16 v) { return v; }
template <>
inline v16 VR<c10::BFloat16>(v16 v) {
  const u16v u = reinterpret_cast<u16v>(v);
  const u16v r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16;
  const u16v nan = u16v{} + 0x7fc00000u;
  return reinterpret_cast<v16>((u & 0x7fffffffu) > 0x7f800000u ? nan : r);
}

// p[0..16) = v rounded to T (the bf16 rounding on raw bits, as put())
inline void vst(c10::BFloat16* p, v16 v) {
  const u16v u = reinterpret_cast<u16v>(v);
  const u16v r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u16v bits = (u & 0x7fffffffu) > 0x7f800000u ? u16v{} + 0x7fc0u : r;
  *reinterpret_cast<h16u*>(p) = __builtin_convertvector(bits, h16v);
}

// R(W) as float in the layouts the tiles read, built once per call.
struct MlpWeights {
  alignas(64) float w1t[kMD * kMH];  // fc1 weight transposed [c][j]
  alignas(64) float w1[kMH * kMD];   // fc1 weight [j][c]
  alignas(64) float w2t[kMH * kMD];  // fc2 weight transposed [j][o]
  alignas(64) float w2[kMD * kMH];   // fc2 weight [o][j]
  alignas(64) float b1[kMH];
  alignas(64) float b2[kMD];
  // the same four as bf16 pairs along the reduction index k, [k/2][n][2], for the bf16 dot-product instruction
  alignas(64) uint16_t w1t_p[kMD * kMH], w1_p[kMH * kMD], w2t_p[kMH * kMD], w2_p[kMD * kMH];
};

// B [K][N] (float values that are bf16) as pairs [K/2][N][2] of bf16 bits
inline void pack_pairs(const float* B, int K, int N, uint16_t* out) {
  for (int k = 0; k < K; k += 2)
    for (int n = 0; n < N; ++n)
      for (int h = 0; h < 2; ++h)
        out[(k / 2) * N * 2 + n * 2 + h] = static_cast<uint16_t>(bf16_bits(B[(k + h) * N + n]));
}

template <typename T>
void fill_mlp_weights(MlpWeights& W, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2) {
  const float *p1 = w1.data_ptr<float>(), *p2 = w2.data_ptr<float>();
  for (int j = 0; j < kMH; ++j)
    for (int c = 0; c < kMD; ++c) {
      W.w1[j * kMD + c] = W.w1t[c * kMH + j] = R<T>(p1[j * kMD + c]);
      W.w2[c * kMH + j] = W.w2t[j * kMD + c] = R<T>(p2[c * kMH + j]);
    }
  for (int j = 0; j < kMH; ++j) W.b1[j] = R<T>(b1.data_ptr<float>()[j]);
  for (int c = 0; c < kMD; ++c) W.b2[c] = R<T>(b2.data_ptr<float>()[c]);
  if (std::is_same_v<T, c10::BFloat16>) {
    pack_pairs(W.w1t, kMD, kMH, W.w1t_p);
    pack_pairs(W.w2, kMD, kMH, W.w2_p);
    pack_pairs(W.w1, kMH, kMD, W.w1_p);
    pack_pairs(W.w2t, kMH, kMD, W.w2t_p);
  }
}

#if defined(__AVX512BF16__)
// acc += Σ over the pair (a_lo, a_hi) · (B[k], B[k+1]) lane by lane: one VDPBF16PS (bf16 products, float32 sums);
// `pair` holds a_lo's bf16 bits in its low half and a_hi's in its high half (broadcast from memory)
inline v16 dp_pair(v16 acc, uint32_t pair, const uint16_t* bp) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)),
                          (__m512bh)_mm512_loadu_si512(bp));
}
// The pairs (a[2k], a[2k+1]) of n floats holding bf16 values (n a multiple of 16) as n/2 words in p: one
// conversion per 16 values (exact: the values are bf16 already) instead of building each word in scalar code
inline void row_pairs(const float* a, int n, uint32_t* p) {
  for (int k = 0; k < n; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + k / 2),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + k)));
}
// The pairs (a0[j], a1[j]) of two rows of n floats holding bf16 values as n words in p (lane-wise bit ops)
inline void rows_interleaved(const float* a0, const float* a1, int n, uint32_t* p) {
  const u16v hi = u16v{} + 0xffff0000u;
  for (int j = 0; j < n; j += 16) {
    const u16v w = (reinterpret_cast<u16v>(vld(a1 + j)) & hi) | (reinterpret_cast<u16v>(vld(a0 + j)) >> 16);
    *reinterpret_cast<u16v*>(p + j) = w;
  }
}
#endif

// acc[r] += a[r]·B for the tile's rows: a [kTR][16], B [16][64] (row k of B: the 64 outputs' weights of input k);
// Bp: B as bf16 pairs (pack_pairs), used for T = bf16 where the CPU has the bf16 dot product
template <typename T>
inline void tile_16to64(const float* a, const float* B, const uint16_t* Bp, v16 (&acc)[kTR][4]) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // a and B hold bf16 values: pairs of k per instruction
    alignas(64) uint32_t ap[kTR][kMD / 2];
    for (int r = 0; r < kTR; ++r) row_pairs(a + r * kMD, kMD, ap[r]);
    for (int k = 0; k < kMD; k += 2) {
      const uint16_t* bk = Bp + (k / 2) * kMH * 2;
      for (int r = 0; r < kTR; ++r)
        for (int q = 0; q < 4; ++q) acc[r][q] = dp_pair(acc[r][q], ap[r][k / 2], bk + 32 * q);
    }
    return;
  }
#endif
  (void)Bp;
  for (int k = 0; k < kMD; ++k) {
    const v16 b0 = vld(B + k * kMH), b1 = vld(B + k * kMH + 16), b2 = vld(B + k * kMH + 32),
              b3 = vld(B + k * kMH + 48);
    for (int r = 0; r < kTR; ++r) {
      const v16 av = bc(a[r * kMD + k]);
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
      acc[r][2] += av * b2;
      acc[r][3] += av * b3;
    }
  }
}

// act[r] = R(gelu(R(m[r]·W1ᵀ + b1))) for the tile's rows (m: [kTR][16] float, act: [kTR][64]); with dgelu,
// also GELU'(pre) in float32.
template <typename T>
inline void tile_fc1_gelu(const MlpWeights& W, const float* m, float* act, float* dgelu) {
  v16 acc[kTR][4];
  for (int r = 0; r < kTR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = vld(W.b1 + 16 * q);
  tile_16to64<T>(m, W.w1t, W.w1t_p, acc);
  for (int r = 0; r < kTR; ++r)
    for (int q = 0; q < 4; ++q) vst(act + r * kMH + 16 * q, VR<T>(acc[r][q]));
  if (dgelu) {
    _Pragma("omp simd") for (int k = 0; k < kTR * kMH; ++k) {
      const float x = act[k], e = gelu_exp(x), cdf = gelu_cdf(x, e);
      act[k] = R<T>(x * cdf);
      dgelu[k] = gelu_grad(x, cdf, e);
    }
  } else {
    _Pragma("omp simd") for (int k = 0; k < kTR * kMH; ++k) act[k] = R<T>(gelu(act[k]));
  }
}

// acc[r] += a[r]·B for the tile's rows: a [kTR][64], B [64][16]; Bp as in tile_16to64
template <typename T>
inline void tile_64to16(const float* a, const float* B, const uint16_t* Bp, v16 (&acc)[kTR]) {
  v16 acc2[kTR];
  for (int r = 0; r < kTR; ++r) acc2[r] = v16{};
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    alignas(64) uint32_t ap[kTR][kMH / 2];
    for (int r = 0; r < kTR; ++r) row_pairs(a + r * kMH, kMH, ap[r]);
    for (int k = 0; k < kMH; k += 4) {
      const uint16_t *b0 = Bp + (k / 2) * kMD * 2, *b1 = b0 + kMD * 2;
      for (int r = 0; r < kTR; ++r) {
        acc[r] = dp_pair(acc[r], ap[r][k / 2], b0);
        acc2[r] = dp_pair(acc2[r], ap[r][k / 2 + 1], b1);
      }
    }
    for (int r = 0; r < kTR; ++r) acc[r] += acc2[r];
    return;
  }
#endif
  (void)Bp;
  for (int k = 0; k < kMH; k += 2) {
    const v16 w0 = vld(B + k * kMD), w1 = vld(B + (k + 1) * kMD);
    for (int r = 0; r < kTR; ++r) {
      acc[r] += bc(a[r * kMH + k]) * w0;
      acc2[r] += bc(a[r * kMH + k + 1]) * w1;
    }
  }
  for (int r = 0; r < kTR; ++r) acc[r] += acc2[r];
}

// mo[r] = R(act[r]·W2ᵀ + b2) (act: [kTR][64], mo: [kTR][16])
template <typename T>
inline void tile_fc2(const MlpWeights& W, const float* act, float* mo) {
  v16 acc[kTR];
  for (int r = 0; r < kTR; ++r) acc[r] = vld(W.b2);
  tile_64to16<T>(act, W.w2t, W.w2t_p, acc);
  for (int r = 0; r < kTR; ++r) vst(mo + r * kMD, VR<T>(acc[r]));
}

// dw[j] += Σ_r a[r][j] · b[r] over the tile's rows (a [kTR][64], dw [64][16]): a weight gradient. Under bf16
// (a and b hold bf16 values) rows go in pairs through the bf16 dot product: lane c of a pair vector holds
// (b[r][c], b[r+1][c]).
template <typename T>
inline void outer_accumulate(const float* a, const v16 (&b)[kTR], float* __restrict dw) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static_assert(kTR == 4, "rows in two pairs");
    const u16v lo = u16v{} + 0xffff0000u;
    const u16v p01 = (reinterpret_cast<u16v>(b[1]) & lo) | (reinterpret_cast<u16v>(b[0]) >> 16);
    const u16v p23 = (reinterpret_cast<u16v>(b[3]) & lo) | (reinterpret_cast<u16v>(b[2]) >> 16);
    const __m512bh b01 = (__m512bh)p01, b23 = (__m512bh)p23;
    alignas(64) uint32_t a01[kMH], a23[kMH];
    rows_interleaved(a, a + kMH, kMH, a01);
    rows_interleaved(a + 2 * kMH, a + 3 * kMH, kMH, a23);
    for (int j = 0; j < kMH; ++j) {
      v16 acc = vld(dw + j * kMD);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a01[j])), b01);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a23[j])), b23);
      vst(dw + j * kMD, acc);
    }
    return;
  }
#endif
  for (int j = 0; j < kMH; ++j) {
    v16 sj = bc(a[j]) * b[0];
    for (int r = 1; r < kTR; ++r) sj += bc(a[r * kMH + j]) * b[r];
    vst(dw + j * kMD, vld(dw + j * kMD) + sj);
  }
}

// Backward of the tile's MLP from dmlp [kTR][16] (d of the MLP output, T-rounded; zero on padding rows), with
// act / dgelu from tile_fc1_gelu and m the tile's input: accumulates the weight gradients dw1 [j][c],
// dw2t [j][o], db1, db2 and writes dm [kTR][16] = R(dpre·W1), d of the MLP input. `dpre` is scratch [kTR][64].
template <typename T>
inline void tile_mlp_backward(const MlpWeights& W, const float* m, const float* act, const float* dgelu,
                              const float* dmlp, float* dpre, float* __restrict dw1, float* __restrict dw2t,
                              float* __restrict db1, float* __restrict db2, float* dm) {
  v16 g[kTR], mv[kTR];
  for (int r = 0; r < kTR; ++r) {
    g[r] = vld(dmlp + r * kMD);
    mv[r] = vld(m + r * kMD);
  }
  vst(db2, vld(db2) + ((g[0] + g[1]) + (g[2] + g[3])));
  // dW2ᵀ[j] += Σ_r act[r][j] · dmlp[r]
  outer_accumulate<T>(act, g, dw2t);
  // d act = R(dmlp·W2), then d pre = R(d act · GELU')
  v16 da[kTR][4];
  for (int r = 0; r < kTR; ++r)
    for (int q = 0; q < 4; ++q) da[r][q] = v16{};
  tile_16to64<T>(dmlp, W.w2, W.w2_p, da);
  for (int q = 0; q < 4; ++q) {
    v16 s = v16{};
    for (int r = 0; r < kTR; ++r) {
      const v16 d = VR<T>(VR<T>(da[r][q]) * vld(dgelu + r * kMH + 16 * q));
      vst(dpre + r * kMH + 16 * q, d);
      s += d;
    }
    vst(db1 + 16 * q, vld(db1 + 16 * q) + s);
  }
  // dW1[j] += Σ_r dpre[r][j] · m[r]; dm[r] = R(Σ_j dpre[r][j] · W1[j])
  outer_accumulate<T>(dpre, mv, dw1);
  v16 d[kTR];
  for (int r = 0; r < kTR; ++r) d[r] = v16{};
  tile_64to16<T>(dpre, W.w1, W.w1_p, d);
  for (int r = 0; r < kTR; ++r) vst(dm + r * kMD, VR<T>(d[r]));
}

// Splits n rows into at most `ranges` contiguous ranges of whole chunks and runs body(range index, begin, end) for
// each, one range per intra-op thread.
template <typename F>
void for_ranges(int64_t n, int64_t chunk, int64_t ranges, const F& body) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int64_t per = ((n_chunks + ranges - 1) / ranges) * chunk;
  // the ATen calls inside run in the caller's grad, inference and dispatch states (thread-local)
  const at::ThreadLocalState state;
  at::parallel_for(0, ranges, 1, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t k = b; k < e; ++k) {
      const int64_t lo = k * per, hi = std::min(n, lo + per);
      if (lo < hi) body(k, lo, hi);
    }
  });
}

int64_t n_ranges(int64_t n, int64_t chunk) {
  const int64_t n_chunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
}

// Sum over the first dimension of per-range partials [ranges, ...] in range order.
at::Tensor sum_ranges(const at::Tensor& parts) {
  at::Tensor total = parts[0].clone();
  for (int64_t k = 1; k < parts.size(0); ++k) total.add_(parts[k]);
  return total;
}

// The channel count: a compile-time constant DC (16, the released models' D_pix) so that channel loops unroll
// and vectorise, or the runtime D (DC = 0).
#define CHANNELS const int64_t D = DC ? DC : D_
#define CHANNEL_LOOP _Pragma("omp simd") for (int64_t c = 0; c < D; ++c)

// rstd of one row (fused_rms_norm's: 1/sqrt(mean(x²) + eps) in float32).
template <typename T, int DC>
inline float row_rstd(const T* x, int64_t D_, float eps) {
  CHANNELS;
  float ss = 0.f;
  _Pragma("omp simd reduction(+ : ss)") for (int64_t c = 0; c < D; ++c) {
    const float v = ld(x[c]);
    ss += v * v;
  }
  return 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
}

// Backward of n = R(x·r)·w for one row, given xh = x·r, nb = R(xh) and dn = d n (float32): accumulates d w
// into dnw and writes d x (float32) to dx.
template <typename T, int DC>
inline void row_norm_backward(const float* xh, const float* nb, const float* dn, const float* w, float r,
                              int64_t D_, float* dnw, float* dx) {
  CHANNELS;
  float dxh[DC ? DC : 1024];
  float proj = 0.f;
  _Pragma("omp simd reduction(+ : proj)") for (int64_t c = 0; c < D; ++c) {
    dnw[c] += dn[c] * nb[c];
    dxh[c] = R<T>(dn[c] * w[c]);
    proj += dxh[c] * xh[c];
  }
  proj /= static_cast<float>(D);
  CHANNEL_LOOP dx[c] = (dxh[c] - xh[c] * proj) * r;
}

// xh = x·r (float32) and nb = R(xh), the normalised row as the forward rounded it.
template <typename T, int DC>
inline void row_normalized(const T* x, float r, int64_t D_, float* xh, float* nb) {
  CHANNELS;
  CHANNEL_LOOP {
    xh[c] = ld(x[c]) * r;
    nb[c] = R<T>(xh[c]);
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t D, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == N && t.size(1) == D && t.is_contiguous(),
              name, ": expected a contiguous CPU tensor [", N, ", ", D, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

void check_param(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat, name,
              ": expected a contiguous float32 CPU tensor");
}

void check_act(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "pixel_fused: float32 or bfloat16 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= 1024, "pixel_fused: rows of at most 1024 channels");
}

// Per-row bias tables of modulations computed without their bias (the bias is added here, in float32, then
// rounded to the activation dtype): [pieces, P, D] float32, row i of the activations using row i % P (the pixel
// of its patch). Absent, a table of zeros with P = 1, which changes nothing (R(v + 0) = v for v in T).
at::Tensor bias_table(const c10::optional<at::Tensor>& bias, int64_t pieces, int64_t D, const at::Tensor& like) {
  if (!bias.has_value()) return at::zeros({pieces, 1, D}, like.options().dtype(at::kFloat));
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 3 &&
                  b.size(0) == pieces && b.size(2) == D && b.size(1) > 0,
              "modulation bias: expected a contiguous float32 CPU tensor [", pieces, ", P, ", D, "], got ",
              b.sizes());
  return b;
}

// Calls KERNEL<T, DC>(args...) for the activation dtype of `x` and its channel count.
#define DISPATCH(x, KERNEL, ...)                                                       \
  do {                                                                                 \
    const bool bf = (x).scalar_type() == at::kBFloat16, d16 = (x).size(1) == 16;       \
    if (bf && d16) KERNEL<c10::BFloat16, 16>(__VA_ARGS__);                             \
    else if (bf) KERNEL<c10::BFloat16, 0>(__VA_ARGS__);                                \
    else if (d16) KERNEL<float, 16>(__VA_ARGS__);                                      \
    else KERNEL<float, 0>(__VA_ARGS__);                                                \
  } while (0)

// ---------------------------------------------------------------------------------------------------------------
// u = R(rmsnorm(x)·w ⊙ scale [+ shift])
template <typename T, int DC>
void norm_scale_fwd_impl(const at::Tensor& x, const c10::optional<at::Tensor>& shift, const at::Tensor& scale,
                         const at::Tensor& w, double eps, const at::Tensor& sbias, at::Tensor& u, at::Tensor& rstd) {
  const int64_t N = x.size(0), D_ = x.size(1);
  CHANNELS;
  const T* xp = x.data_ptr<T>();
  const T* shp = shift.has_value() ? shift->data_ptr<T>() : nullptr;
  const T* scp = scale.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  const float* sbp = sbias.data_ptr<float>();
  const int64_t P = sbias.size(1);
  T* up = u.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  if (DC == kMD) {  // one vector per row
    const v16 wv = vld(wp);
    at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t o = i * D;
        const v16 xv = vld(xp + o);
        const float r = 1.f / std::sqrt(hsum(xv * xv) / static_cast<float>(kMD) + static_cast<float>(eps));
        rp[i] = r;
        const v16 v = VR<T>(xv * r) * wv * VR<T>(vld(scp + o) + vld(sbp + (i % P) * D));
        vst(up + o, shp ? v + vld(shp + o) : v);
      }
    });
    return;
  }
  at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t o = i * D;
      const float* sb = sbp + (i % P) * D;
      const float r = row_rstd<T, DC>(xp + o, D, static_cast<float>(eps));
      rp[i] = r;
      if (shp) {
        CHANNEL_LOOP put(up, o + c, R<T>(ld(xp[o + c]) * r) * wp[c] * R<T>(ld(scp[o + c]) + sb[c]) +
                                        ld(shp[o + c]));
      } else {
        CHANNEL_LOOP put(up, o + c, R<T>(ld(xp[o + c]) * r) * wp[c] * R<T>(ld(scp[o + c]) + sb[c]));
      }
    }
  });
}

std::vector<at::Tensor> norm_scale_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& shift,
                                       const at::Tensor& scale, const at::Tensor& w, double eps,
                                       const c10::optional<at::Tensor>& scale_bias) {
  check_act(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto cd = x.scalar_type();
  check_rows(x, "x", N, D, cd);
  check_rows(scale, "scale", N, D, cd);
  if (shift.has_value()) check_rows(*shift, "shift", N, D, cd);
  check_param(w, "norm weight");
  at::Tensor u = at::empty_like(x);
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  const at::Tensor sbias = bias_table(scale_bias, 1, D, x);
  DISPATCH(x, norm_scale_fwd_impl, x, shift, scale, w, eps, sbias, u, rstd);
  return {u, rstd};
}

template <typename T, int DC>
void norm_scale_bwd_impl(const at::Tensor& G, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& rstd,
                         const at::Tensor& w, const at::Tensor& sbias, at::Tensor& dx, at::Tensor& dscale,
                         at::Tensor& dnw_parts, at::Tensor& dsb_parts) {
  const int64_t N = x.size(0), D_ = x.size(1);
  CHANNELS;
  const T *gp = G.data_ptr<T>(), *xp = x.data_ptr<T>(), *scp = scale.data_ptr<T>();
  const float *rp = rstd.data_ptr<float>(), *wp = w.data_ptr<float>();
  T *dxp = dx.data_ptr<T>(), *dsp = dscale.data_ptr<T>();
  const float* sbp = sbias.data_ptr<float>();
  const int64_t P = sbias.size(1);
  if (DC == kMD) {  // one vector per row
    const v16 wv = vld(wp);
    for_ranges(N, kChunk, dnw_parts.size(0), [&](int64_t k, int64_t lo, int64_t hi) {
      float* dsbk = dsb_parts.data_ptr<float>() + k * P * D;
      v16 dnwv = v16{};
      for (int64_t i = lo; i < hi; ++i) {
        const float r = rp[i];
        const int64_t o = i * D;
        float* dsb = dsbk + (i % P) * D;
        const v16 xh = vld(xp + o) * r, nb = VR<T>(xh), g = vld(gp + o);
        const v16 ds = VR<T>(g * (nb * wv));
        vst(dsp + o, ds);
        vst(dsb, vld(dsb) + ds);
        const v16 dn = g * VR<T>(vld(scp + o) + vld(sbp + (i % P) * D));
        dnwv += dn * nb;
        const v16 dxh = VR<T>(dn * wv);
        const float proj = hsum(dxh * xh) / static_cast<float>(kMD);
        vst(dxp + o, (dxh - xh * proj) * r);
      }
      float* dnw = dnw_parts.data_ptr<float>() + k * D;
      vst(dnw, vld(dnw) + dnwv);
    });
    return;
  }
  for_ranges(N, kChunk, dnw_parts.size(0), [&](int64_t k, int64_t lo, int64_t hi) {
    float* dnw = dnw_parts.data_ptr<float>() + k * D;
    float* dsbk = dsb_parts.data_ptr<float>() + k * P * D;
    float xh[DC ? DC : 1024], nb[DC ? DC : 1024], dn[DC ? DC : 1024], dxr[DC ? DC : 1024];
    for (int64_t i = lo; i < hi; ++i) {
      const float r = rp[i];
      const int64_t o = i * D;
      const float* sb = sbp + (i % P) * D;
      float* dsb = dsbk + (i % P) * D;
      row_normalized<T, DC>(xp + o, r, D, xh, nb);
      CHANNEL_LOOP {
        const float g = ld(gp[o + c]);
        const float ds = R<T>(g * (nb[c] * wp[c]));
        put(dsp, o + c, ds);
        dsb[c] += ds;
        dn[c] = g * R<T>(ld(scp[o + c]) + sb[c]);
      }
      row_norm_backward<T, DC>(xh, nb, dn, wp, r, D, dnw, dxr);
      CHANNEL_LOOP put(dxp, o + c, dxr[c]);
    }
  });
}

std::vector<at::Tensor> norm_scale_bwd(const at::Tensor& G, const at::Tensor& x, const at::Tensor& scale,
                                       const at::Tensor& rstd, const at::Tensor& w,
                                       const c10::optional<at::Tensor>& scale_bias) {
  check_act(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto cd = x.scalar_type();
  check_rows(G, "grad", N, D, cd);
  check_rows(scale, "scale", N, D, cd);
  check_rows(rstd, "rstd", N, 1, at::kFloat);
  check_param(w, "norm weight");
  at::Tensor dx = at::empty_like(x), dscale = at::empty_like(x);
  const at::Tensor sbias = bias_table(scale_bias, 1, D, x);
  const int64_t T = n_ranges(N, kChunk);
  at::Tensor parts = at::zeros({T, D}, x.options().dtype(at::kFloat));
  at::Tensor dsb = at::zeros({T, 1, sbias.size(1), D}, x.options().dtype(at::kFloat));
  DISPATCH(x, norm_scale_bwd_impl, G, x, scale, rstd, w, sbias, dx, dscale, parts, dsb);
  return {dx, dscale, sum_ranges(parts), sum_ranges(dsb)};
}

// ---------------------------------------------------------------------------------------------------------------
// y = R(x + gate1 ⊙ h); m = R(rmsnorm(y)·w ⊙ scale + shift); out = R(y + gate ⊙ fc2(gelu(fc1(m))))
template <typename T, int DC>
void mlp_fwd_impl(const at::Tensor& x, const at::Tensor& h, const at::Tensor& g1, const at::Tensor& sh,
                  const at::Tensor& sc, const at::Tensor& gt, const at::Tensor& w, const at::Tensor& w1t,
                  const at::Tensor& b1c, const at::Tensor& w2t, const at::Tensor& b2c, double eps,
                  const at::Tensor& mbias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                  const at::Tensor& b2, at::Tensor& y, at::Tensor& m, at::Tensor& out, at::Tensor& rstd) {
  const int64_t N = x.size(0), D_ = x.size(1);
  CHANNELS;
  const T *xp = x.data_ptr<T>(), *hp = h.data_ptr<T>(), *g1p = g1.data_ptr<T>(), *shp = sh.data_ptr<T>(),
          *scp = sc.data_ptr<T>(), *gtp = gt.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  T *yp = y.data_ptr<T>(), *mp = m.data_ptr<T>(), *op = out.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  const float fe = static_cast<float>(eps);
  const int64_t H = w1t.size(1);
  const int64_t P = mbias.size(1), PD = P * D;  // biases of gate1, shift, scale, gate: [4, P, D]
  const float* mbp = mbias.data_ptr<float>();
  if (DC == kMD && H == kMH) {  // register-tiled MLP (the released width)
    MlpWeights W;
    fill_mlp_weights<T>(W, w1, b1, w2, b2);
    for_ranges(N, kChunk, n_ranges(N, kChunk), [&](int64_t, int64_t lo, int64_t hi) {
      alignas(64) float mf[kTR * kMD], act[kTR * kMH], mo[kTR * kMD];
      for (int64_t i0 = lo; i0 < hi; i0 += kTR) {
        const int64_t n = std::min<int64_t>(kTR, hi - i0);
        for (int64_t r = 0; r < kTR; ++r) {
          if (r >= n) {
            vst(mf + r * kMD, v16{});
            continue;
          }
          const int64_t i = i0 + r, o = i * D;
          const float *bg1 = mbp + (i % P) * D, *bsh = bg1 + PD, *bsc = bsh + PD;
          const v16 yv = VR<T>(vld(xp + o) + VR<T>(vld(g1p + o) + vld(bg1)) * vld(hp + o));
          vst(yp + o, yv);
          const float rs = 1.f / std::sqrt(hsum(yv * yv) / static_cast<float>(kMD) + fe);
          rp[i] = rs;
          const v16 mv = VR<T>(VR<T>(vld(shp + o) + vld(bsh)) + VR<T>(yv * rs) * vld(wp) * VR<T>(vld(scp + o) + vld(bsc)));
          vst(mp + o, mv);
          vst(mf + r * kMD, mv);
        }
        tile_fc1_gelu<T>(W, mf, act, nullptr);
        tile_fc2<T>(W, act, mo);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t i = i0 + r, o = i * D;
          const float* bgt = mbp + 3 * PD + (i % P) * D;
          vst(op + o, vld(yp + o) + VR<T>(vld(gtp + o) + vld(bgt)) * vld(mo + r * kMD));
        }
      }
    });
    return;
  }
  for_ranges(N, kChunk, n_ranges(N, kChunk), [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t i0 = lo; i0 < hi; i0 += kChunk) {
      const int64_t i1 = std::min(hi, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = i * D;
        const float *bg1 = mbp + (i % P) * D, *bsh = bg1 + PD, *bsc = bsh + PD;
        CHANNEL_LOOP put(yp, o + c, ld(xp[o + c]) + R<T>(ld(g1p[o + c]) + bg1[c]) * ld(hp[o + c]));
        const float r = row_rstd<T, DC>(yp + o, D, fe);
        rp[i] = r;
        CHANNEL_LOOP put(mp, o + c, R<T>(ld(shp[o + c]) + bsh[c]) +
                                        R<T>(ld(yp[o + c]) * r) * wp[c] * R<T>(ld(scp[o + c]) + bsc[c]));
      }
      // fc1 (bias added in the GEMM's float32 accumulator, one rounding as in autocast), then GELU in place
      at::Tensor a = at::addmm(b1c, m.narrow(0, i0, i1 - i0), w1t);
      T* ap = a.data_ptr<T>();
      const int64_t rows = i1 - i0;
      for (int64_t i = 0; i < rows; ++i) {
        T* __restrict ar = ap + i * H;
        _Pragma("omp simd") for (int64_t q = 0; q < H; ++q) {
          put(ar, q, gelu(ld(ar[q])));
        }
      }
      at::Tensor mo = at::addmm(b2c, a, w2t);
      const T* mop = mo.data_ptr<T>() - i0 * D;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = i * D;
        const float* bgt = mbp + 3 * PD + (i % P) * D;
        CHANNEL_LOOP put(op, o + c, ld(yp[o + c]) + R<T>(ld(gtp[o + c]) + bgt[c]) * ld(mop[o + c]));
      }
    }
  });
}

std::vector<at::Tensor> mlp_residual_fwd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& g1,
                                         const at::Tensor& sh, const at::Tensor& sc, const at::Tensor& gt,
                                         const at::Tensor& w, const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2, double eps,
                                         const c10::optional<at::Tensor>& mod_bias) {
  check_act(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto cd = x.scalar_type();
  for (auto* p : {&x, &h, &g1, &sh, &sc, &gt}) check_rows(*p, "activation", N, D, cd);
  for (auto* p : {&w, &w1, &b1, &w2, &b2}) check_param(*p, "parameter");
  at::Tensor y = at::empty_like(x), m = at::empty_like(x), out = at::empty_like(x);
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  at::Tensor w1t = w1.to(cd).t(), b1c = b1.to(cd), w2t = w2.to(cd).t(), b2c = b2.to(cd);
  const at::Tensor mbias = bias_table(mod_bias, 4, D, x);
  DISPATCH(x, mlp_fwd_impl, x, h, g1, sh, sc, gt, w, w1t, b1c, w2t, b2c, eps, mbias, w1, b1, w2, b2, y, m, out,
           rstd);
  return {out, y, m, rstd};
}

template <typename T, int DC>
void mlp_bwd_impl(const at::Tensor& G, const at::Tensor& y, const at::Tensor& sc, const at::Tensor& gt,
                  const at::Tensor& m, const at::Tensor& rstd, const at::Tensor& w, const at::Tensor& w1c,
                  const at::Tensor& b1c, const at::Tensor& w2c, const at::Tensor& b2c, const at::Tensor& h,
                  const at::Tensor& g1, const at::Tensor& mbias, const at::Tensor& w1f, const at::Tensor& b1f,
                  const at::Tensor& w2f, const at::Tensor& b2f, at::Tensor& dy, at::Tensor& dh, at::Tensor& dg1,
                  at::Tensor& dsh, at::Tensor& dsc, at::Tensor& dgt, at::Tensor& dnw_parts, at::Tensor& dw1_parts,
                  at::Tensor& db1_parts, at::Tensor& dw2_parts, at::Tensor& db2_parts, at::Tensor& dmb_parts) {
  const int64_t N = y.size(0), D_ = y.size(1);
  CHANNELS;
  const at::Tensor w1t = w1c.t(), w2t = w2c.t();
  const int64_t H = w1c.size(0);
  const T *gp = G.data_ptr<T>(), *yp = y.data_ptr<T>(), *scp = sc.data_ptr<T>(), *gtp = gt.data_ptr<T>(),
          *hp = h.data_ptr<T>(), *g1p = g1.data_ptr<T>();
  const float *rp = rstd.data_ptr<float>(), *wp = w.data_ptr<float>();
  T *dyp = dy.data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dg1p = dg1.data_ptr<T>(), *dscp = dsc.data_ptr<T>(),
    *dgtp = dgt.data_ptr<T>();
  const int64_t P = mbias.size(1), PD = P * D;  // biases of gate1, shift, scale, gate: [4, P, D]
  const float* mbp = mbias.data_ptr<float>();
  if (DC == kMD && H == kMH) {  // register-tiled MLP (the released width)
    MlpWeights W;
    fill_mlp_weights<T>(W, w1f, b1f, w2f, b2f);
    const T* mp = m.data_ptr<T>();
    T* dshp = dsh.data_ptr<T>();
    for_ranges(N, kChunk, dnw_parts.size(0), [&](int64_t k, int64_t lo, int64_t hi) {
      float* dnw = dnw_parts.data_ptr<float>() + k * D;
      float* dmb = dmb_parts.data_ptr<float>() + k * 4 * PD;
      alignas(64) float dw1[kMH * kMD] = {}, dw2t[kMH * kMD] = {}, db1[kMH] = {}, db2[kMD] = {};
      alignas(64) float mf[kTR * kMD], act[kTR * kMH], dg[kTR * kMH], mo[kTR * kMD], dml[kTR * kMD],
          dpre[kTR * kMH], dmf[kTR * kMD];
      const v16 wv = vld(wp);
      v16 dnwv = v16{};
      for (int64_t i0 = lo; i0 < hi; i0 += kTR) {
        const int64_t n = std::min<int64_t>(kTR, hi - i0);
        for (int64_t r = 0; r < kTR; ++r) vst(mf + r * kMD, r < n ? vld(mp + (i0 + r) * D) : v16{});
        // recompute fc1, GELU (keeping GELU') and fc2
        tile_fc1_gelu<T>(W, mf, act, dg);
        tile_fc2<T>(W, act, mo);
        for (int64_t r = 0; r < kTR; ++r) {
          if (r >= n) {
            vst(dml + r * kMD, v16{});
            continue;
          }
          const int64_t i = i0 + r, o = i * D, pd = (i % P) * D;
          float* dbgt = dmb + 3 * PD + pd;
          const v16 g = vld(gp + o);
          const v16 dgt = VR<T>(g * vld(mo + r * kMD));
          vst(dgtp + o, dgt);
          vst(dbgt, vld(dbgt) + dgt);
          vst(dml + r * kMD, VR<T>(g * VR<T>(vld(gtp + o) + vld(mbp + 3 * PD + pd))));
        }
        tile_mlp_backward<T>(W, mf, act, dg, dml, dpre, dw1, dw2t, db1, db2, dmf);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t i = i0 + r;
          const float rs = rp[i];
          const int64_t o = i * D, pd = (i % P) * D;
          float *dbg1 = dmb + pd, *dbsh = dmb + PD + pd, *dbsc = dmb + 2 * PD + pd;
          const v16 dm = vld(dmf + r * kMD);
          vst(dshp + o, dm);
          const v16 xh = vld(yp + o) * rs, nb = VR<T>(xh);
          const v16 ds = VR<T>(dm * nb * wv);
          vst(dscp + o, ds);
          vst(dbsc, vld(dbsc) + ds);
          vst(dbsh, vld(dbsh) + dm);
          const v16 dn = dm * VR<T>(vld(scp + o) + vld(mbp + 2 * PD + pd));
          // backward of the norm: d w and d y
          dnwv += dn * nb;
          const v16 dxh = VR<T>(dn * wv);
          const float proj = hsum(dxh * xh) / static_cast<float>(kMD);
          const v16 dyc = VR<T>(vld(gp + o) + (dxh - xh * proj) * rs);
          vst(dyp + o, dyc);
          const v16 dgv = VR<T>(dyc * vld(hp + o));
          vst(dg1p + o, dgv);
          vst(dbg1, vld(dbg1) + dgv);
          vst(dhp + o, dyc * VR<T>(vld(g1p + o) + vld(mbp + pd)));
        }
      }
      vst(dnw, vld(dnw) + dnwv);
      float *pw1 = dw1_parts.data_ptr<float>() + k * kMH * kMD, *pw2 = dw2_parts.data_ptr<float>() + k * kMD * kMH;
      for (int j = 0; j < kMH; ++j)
        for (int c = 0; c < kMD; ++c) {
          pw1[j * kMD + c] += dw1[j * kMD + c];
          pw2[c * kMH + j] += dw2t[j * kMD + c];
        }
      float *pb1 = db1_parts.data_ptr<float>() + k * kMH, *pb2 = db2_parts.data_ptr<float>() + k * kMD;
      for (int j = 0; j < kMH; ++j) pb1[j] += db1[j];
      for (int c = 0; c < kMD; ++c) pb2[c] += db2[c];
    });
    return;
  }
  for_ranges(N, kChunk, dnw_parts.size(0), [&](int64_t k, int64_t lo, int64_t hi) {
    float* dnw = dnw_parts.data_ptr<float>() + k * D;
    float* dmb = dmb_parts.data_ptr<float>() + k * 4 * PD;
    at::Tensor dw1 = dw1_parts[k], dw2 = dw2_parts[k], db2 = db2_parts[k];
    float* __restrict db1 = db1_parts.data_ptr<float>() + k * H;
    float xh[DC ? DC : 1024], nb[DC ? DC : 1024], dn[DC ? DC : 1024], dxr[DC ? DC : 1024];
    std::vector<float> dgelu(std::min(hi - lo, kChunk) * H);  // GELU'(pre) of the chunk, float32
    for (int64_t i0 = lo; i0 < hi; i0 += kChunk) {
      const int64_t i1 = std::min(hi, i0 + kChunk), rows = i1 - i0;
      at::Tensor mc = m.narrow(0, i0, rows);
      // recompute fc1 and GELU, keeping GELU' for the backward of this chunk
      at::Tensor act = at::addmm(b1c, mc, w1t);
      T* ap = act.data_ptr<T>();
      for (int64_t i = 0; i < rows; ++i) {
        T* __restrict ar = ap + i * H;
        float* __restrict dgr = dgelu.data() + i * H;
        _Pragma("omp simd") for (int64_t q = 0; q < H; ++q) {
          const float x = ld(ar[q]), e = gelu_exp(x), cdf = gelu_cdf(x, e);
          put(ar, q, x * cdf);
          dgr[q] = gelu_grad(x, cdf, e);
        }
      }
      at::Tensor mo = at::addmm(b2c, act, w2t);
      at::Tensor dmlp = at::empty({rows, D}, y.options());
      const T* mop = mo.data_ptr<T>() - i0 * D;
      T* dmp = dmlp.data_ptr<T>() - i0 * D;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = i * D, pd = (i % P) * D;
        const float* bgt = mbp + 3 * PD + pd;
        float* dbgt = dmb + 3 * PD + pd;
        CHANNEL_LOOP {
          const float g = ld(gp[o + c]);
          const float dg = R<T>(g * ld(mop[o + c]));
          put(dgtp, o + c, dg);
          dbgt[c] += dg;
          put(dmp, o + c, g * R<T>(ld(gtp[o + c]) + bgt[c]));
        }
      }
      dw2.add_(at::mm(dmlp.t(), act));
      db2.add_(dmlp.sum(0, /*keepdim=*/false, at::kFloat));
      at::Tensor da = at::mm(dmlp, w2c);  // d act, then d pre in place
      T* dap = da.data_ptr<T>();
      for (int64_t i = 0; i < rows; ++i) {
        T* __restrict dar = dap + i * H;
        const float* __restrict dgr = dgelu.data() + i * H;
        _Pragma("omp simd") for (int64_t q = 0; q < H; ++q) {
          const float v = R<T>(ld(dar[q]) * dgr[q]);
          put(dar, q, v);
          db1[q] += v;
        }
      }
      dw1.add_(at::mm(da.t(), mc));
      at::Tensor dsh_c = dsh.narrow(0, i0, rows);
      at::mm_out(dsh_c, da, w1c);
      const T* dmp2 = dsh.data_ptr<T>();
      for (int64_t i = i0; i < i1; ++i) {
        const float r = rp[i];
        const int64_t o = i * D, pd = (i % P) * D;
        const float *bg1 = mbp + pd, *bsc = mbp + 2 * PD + pd;
        float *dbg1 = dmb + pd, *dbsh = dmb + PD + pd, *dbsc = dmb + 2 * PD + pd;
        row_normalized<T, DC>(yp + o, r, D, xh, nb);
        CHANNEL_LOOP {
          const float dm = ld(dmp2[o + c]);
          const float ds = R<T>(dm * nb[c] * wp[c]);
          put(dscp, o + c, ds);
          dbsc[c] += ds;
          dbsh[c] += dm;
          dn[c] = dm * R<T>(ld(scp[o + c]) + bsc[c]);
        }
        row_norm_backward<T, DC>(xh, nb, dn, wp, r, D, dnw, dxr);
        CHANNEL_LOOP {
          const float dyc = R<T>(ld(gp[o + c]) + dxr[c]);
          put(dyp, o + c, dyc);
          const float dg = R<T>(dyc * ld(hp[o + c]));
          put(dg1p, o + c, dg);
          dbg1[c] += dg;
          put(dhp, o + c, dyc * R<T>(ld(g1p[o + c]) + bg1[c]));
        }
      }
    }
  });
}

std::vector<at::Tensor> mlp_residual_bwd(const at::Tensor& G, const at::Tensor& y, const at::Tensor& sc,
                                         const at::Tensor& gt, const at::Tensor& m, const at::Tensor& rstd,
                                         const at::Tensor& w, const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& h,
                                         const at::Tensor& g1, const c10::optional<at::Tensor>& mod_bias) {
  check_act(y);
  const int64_t N = y.size(0), D = y.size(1);
  const auto cd = y.scalar_type();
  for (auto* p : {&G, &sc, &gt, &m, &h, &g1}) check_rows(*p, "activation", N, D, cd);
  check_rows(rstd, "rstd", N, 1, at::kFloat);
  for (auto* p : {&w, &w1, &b1, &w2, &b2}) check_param(*p, "parameter");
  const int64_t T = n_ranges(N, kChunk);
  auto f32 = y.options().dtype(at::kFloat);
  at::Tensor dnw = at::zeros({T, D}, f32), dw1 = at::zeros({T, w1.size(0), w1.size(1)}, f32),
             db1 = at::zeros({T, b1.size(0)}, f32), dw2 = at::zeros({T, w2.size(0), w2.size(1)}, f32),
             db2 = at::zeros({T, b2.size(0)}, f32);
  at::Tensor dy = at::empty_like(y), dh = at::empty_like(y), dg1 = at::empty_like(y), dsh = at::empty_like(y),
             dsc = at::empty_like(y), dgt = at::empty_like(y);
  at::Tensor w1c = w1.to(cd), b1c = b1.to(cd), w2c = w2.to(cd), b2c = b2.to(cd);
  const at::Tensor mbias = bias_table(mod_bias, 4, D, y);
  at::Tensor dmb = at::zeros({T, 4, mbias.size(1), D}, f32);
  DISPATCH(y, mlp_bwd_impl, G, y, sc, gt, m, rstd, w, w1c, b1c, w2c, b2c, h, g1, mbias, w1, b1, w2, b2, dy, dh, dg1,
           dsh, dsc, dgt, dnw, dw1, db1, dw2, db2, dmb);
  return {dy, dh, dg1, dsh, dsc, dgt, sum_ranges(dnw), sum_ranges(dw1), sum_ranges(db1), sum_ranges(dw2),
          sum_ranges(db2), sum_ranges(dmb)};
}

// ---------------------------------------------------------------------------------------------------------------
// out = R(R(rmsnorm(x)·w) @ R(W)ᵀ + R(b)) for a narrow linear (the final layer)
template <typename T, int DC>
void norm_linear_fwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& W, const at::Tensor& b,
                          double eps, at::Tensor& out, at::Tensor& rstd) {
  const int64_t N = x.size(0), D_ = x.size(1), O = W.size(0);
  CHANNELS;
  const T* xp = x.data_ptr<T>();
  const float *wp = w.data_ptr<float>(), *Wp = W.data_ptr<float>(), *bp = b.data_ptr<float>();
  std::vector<float> Wr(O * D), br(O);
  for (int64_t k = 0; k < O * D; ++k) Wr[k] = R<T>(Wp[k]);
  for (int64_t o = 0; o < O; ++o) br[o] = R<T>(bp[o]);
  T* op = out.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  const float fe = static_cast<float>(eps);
  at::parallel_for(0, N, 1024, [&](int64_t b0, int64_t e) {
    float n[DC ? DC : 1024];
    for (int64_t i = b0; i < e; ++i) {
      const T* xr = xp + i * D;
      const float r = row_rstd<T, DC>(xr, D, fe);
      rp[i] = r;
      CHANNEL_LOOP n[c] = R<T>(R<T>(ld(xr[c]) * r) * wp[c]);
      for (int64_t o = 0; o < O; ++o) {
        const float* Wo = Wr.data() + o * D;
        float acc = 0.f;
        _Pragma("omp simd reduction(+ : acc)") for (int64_t c = 0; c < D; ++c) acc += n[c] * Wo[c];
        put(op, i * O + o, acc + br[o]);
      }
    }
  });
}

std::vector<at::Tensor> norm_linear_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& W,
                                        const at::Tensor& b, double eps) {
  check_act(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto cd = x.scalar_type();
  check_rows(x, "x", N, D, cd);
  for (auto* p : {&w, &W, &b}) check_param(*p, "parameter");
  TORCH_CHECK(W.dim() == 2 && W.size(1) == D, "norm_linear: weight [out, ", D, "]");
  at::Tensor out = at::empty({N, W.size(0)}, x.options());
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  DISPATCH(x, norm_linear_fwd_impl, x, w, W, b, eps, out, rstd);
  return {out, rstd};
}

template <typename T, int DC>
void norm_linear_bwd_impl(const at::Tensor& G, const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& w,
                          const at::Tensor& W, at::Tensor& dx, at::Tensor& dnw_parts, at::Tensor& dW_parts,
                          at::Tensor& db_parts) {
  const int64_t N = x.size(0), D_ = x.size(1), O = W.size(0);
  CHANNELS;
  const T *gp = G.data_ptr<T>(), *xp = x.data_ptr<T>();
  const float *rp = rstd.data_ptr<float>(), *wp = w.data_ptr<float>(), *Wp = W.data_ptr<float>();
  std::vector<float> Wr(O * D);
  for (int64_t k = 0; k < O * D; ++k) Wr[k] = R<T>(Wp[k]);
  T* dxp = dx.data_ptr<T>();
  for_ranges(N, kChunk, dnw_parts.size(0), [&](int64_t k, int64_t lo, int64_t hi) {
    float* dnw = dnw_parts.data_ptr<float>() + k * D;
    float* dW = dW_parts.data_ptr<float>() + k * O * D;
    float* db = db_parts.data_ptr<float>() + k * O;
    float xh[DC ? DC : 1024], nb[DC ? DC : 1024], v[DC ? DC : 1024], dn[DC ? DC : 1024], dxr[DC ? DC : 1024];
    for (int64_t i = lo; i < hi; ++i) {
      const float r = rp[i];
      const int64_t o = i * D;
      row_normalized<T, DC>(xp + o, r, D, xh, nb);
      CHANNEL_LOOP {
        v[c] = R<T>(nb[c] * wp[c]);
        dn[c] = 0.f;
      }
      for (int64_t q = 0; q < O; ++q) {
        const float g = ld(gp[i * O + q]);
        db[q] += g;
        float* dWq = dW + q * D;
        const float* Wq = Wr.data() + q * D;
        CHANNEL_LOOP {
          dWq[c] += g * v[c];
          dn[c] += g * Wq[c];
        }
      }
      CHANNEL_LOOP dn[c] = R<T>(dn[c]);
      row_norm_backward<T, DC>(xh, nb, dn, wp, r, D, dnw, dxr);
      CHANNEL_LOOP put(dxp, o + c, dxr[c]);
    }
  });
}

std::vector<at::Tensor> norm_linear_bwd(const at::Tensor& G, const at::Tensor& x, const at::Tensor& rstd,
                                        const at::Tensor& w, const at::Tensor& W) {
  check_act(x);
  const int64_t N = x.size(0), D = x.size(1), O = W.size(0);
  const auto cd = x.scalar_type();
  check_rows(G, "grad", N, O, cd);
  check_rows(rstd, "rstd", N, 1, at::kFloat);
  for (auto* p : {&w, &W}) check_param(*p, "parameter");
  const int64_t T = n_ranges(N, kChunk);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dnw = at::zeros({T, D}, f32), dW = at::zeros({T, O, D}, f32), db = at::zeros({T, O}, f32);
  at::Tensor dx = at::empty_like(x);
  DISPATCH(x, norm_linear_bwd_impl, G, x, rstd, w, W, dx, dnw, dW, db);
  return {dx, sum_ranges(dnw), sum_ranges(dW), sum_ranges(db)};
}

}  // namespace

TORCH_LIBRARY(pixdit_fused, m) {
  m.def("norm_scale_fwd(Tensor x, Tensor? shift, Tensor scale, Tensor w, float eps, Tensor? scale_bias) "
        "-> Tensor[]");
  m.def("norm_scale_bwd(Tensor grad, Tensor x, Tensor scale, Tensor rstd, Tensor w, Tensor? scale_bias) "
        "-> Tensor[]");
  m.def("mlp_residual_fwd(Tensor x, Tensor h, Tensor gate1, Tensor shift, Tensor scale, Tensor gate, Tensor w, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2, float eps, Tensor? mod_bias) -> Tensor[]");
  m.def("mlp_residual_bwd(Tensor grad, Tensor y, Tensor scale, Tensor gate, Tensor m, Tensor rstd, Tensor w, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor h, Tensor gate1, Tensor? mod_bias) -> Tensor[]");
  m.def("norm_linear_fwd(Tensor x, Tensor w, Tensor weight, Tensor bias, float eps) -> Tensor[]");
  m.def("norm_linear_bwd(Tensor grad, Tensor x, Tensor rstd, Tensor w, Tensor weight) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pixdit_fused, CPU, m) {
  m.impl("norm_scale_fwd", &norm_scale_fwd);
  m.impl("norm_scale_bwd", &norm_scale_bwd);
  m.impl("mlp_residual_fwd", &mlp_residual_fwd);
  m.impl("mlp_residual_bwd", &mlp_residual_bwd);
  m.impl("norm_linear_fwd", &norm_linear_fwd);
  m.impl("norm_linear_bwd", &norm_linear_bwd);
}
