#pragma once
// Weight-only int8 products: c = x · Wᵀ with W quantised once per output channel (symmetric,
// int8 in [-127, 127], one float scale a channel) and x quantised per row as the product runs
// (symmetric, [-127, 127], one scale a row), the sums exact in int32. The AVX512_VNNI instruction
// vpdpbusd multiplies unsigned bytes by signed ones, so a row is stored shifted by 128 (u8) and
// the shift is taken back with each channel's 128 · Σ_k W: c = s_row · s_channel · (Σ u·w − 128·Σ w).
// Integer sums do not depend on their order, so every form — vpdpbusd, or int32 vectors on a CPU
// without it — gives the same int32 and the same float bits (docs/kernels.md#int8).
//
// Layouts: a row is its quads (4 consecutive k, one 32-bit word, the first in the low byte); W is
// in panels of 16 channels, each panel its quads, quad by quad (as bf16.hpp's pairs).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <moekit/core/detail/vector_kernels.hpp>
#include <moekit/core/error.hpp>

#if MOEKIT_VECTOR_DISPATCH
#include <immintrin.h>
#endif

namespace moekit::detail {

/// Channels of a panel of W: one 64-byte vector of int32 sums.
inline constexpr Index int8_panel = 16;
/// The largest magnitude a quantised value takes.
inline constexpr float int8_levels = 127.0f;
/// The depth past which Σ u·w might leave int32: 255 · 127 per term.
inline constexpr Index int8_max_depth = (Index{1} << 31) / (255 * 127);

inline Index int8_quads(Index k) { return (k + 3) / 4; }

/// v rounded to the nearest integer, ties to even, for |v| ≤ 2^22, in place — in any vector
/// width, with no call: adding and taking away 1.5 · 2^23 leaves the rounded value in float's
/// last place.
template <class V>
[[gnu::always_inline]] inline void round_even(V& v) {
  const V magic = V{} + 0x1.8p23f;
  v = (v + magic) - magic;
}

/// One row x[0, k) quantised: its scale (max |x| / 127; 0 for a zero row; NaN for a row with a
/// value that is not finite, so that the products it enters are NaN, as float's would be) and its
/// quads, each value round(x / scale) + 128 as a byte (ties to even), 128 past k. In 16-float vectors.
[[gnu::always_inline]] inline float quantize_row(std::uint32_t* quads, const float* x, Index k) {
  using F = Vector<float, 64>;
  using I = Vector<std::int32_t, 64>;
  const Index whole = k / 16 * 16;
  F top{}, finite{};  // finite: v − v, 0 for finite v and NaN for the others
  for (Index j = 0; j < whole; j += 16) {
    const F v = vector_at<64>(x + j);
    top = top > v ? top : v;
    top = top > -v ? top : -v;
    finite += v - v;
  }
  float max = 0.0f, check = 0.0f;
  for (int l = 0; l < 16; ++l) {
    max = std::max(max, top[l]);
    check += finite[l];
  }
  for (Index j = whole; j < k; ++j) {
    max = std::max(max, std::abs(x[j]));
    check += x[j] - x[j];
  }
  auto* bytes = reinterpret_cast<std::uint8_t*>(quads);
  if (check != 0.0f) {
    std::fill(bytes, bytes + 4 * int8_quads(k), std::uint8_t{128});
    return std::numeric_limits<float>::quiet_NaN();
  }
  // Divided, not multiplied by an inverse: a product could be fused with the rounding's addition.
  const float scale = max / int8_levels, divisor = scale > 0.0f ? scale : 1.0f;
  for (Index j = 0; j < whole; j += 16) {
    F v = vector_at<64>(x + j) / divisor;
    round_even(v);
    const I q = __builtin_convertvector(v, I) + 128;
    vector_at<16>(bytes + j) = __builtin_convertvector(q, Vector<std::uint8_t, 16>);
  }
  for (Index j = whole; j < 4 * int8_quads(k); ++j) {
    float v = j < k ? x[j] / divisor : 0.0f;
    round_even(v);
    bytes[j] = static_cast<std::uint8_t>(static_cast<std::int32_t>(v) + 128);
  }
  return scale;
}

/// Rows of a matrix (row i at x + i·xs) quantised: row i's quads at out + i·quads, its scale in
/// scales[i].
[[gnu::always_inline]] inline void quantize_rows(std::uint32_t* out, float* scales, const float* x, Index xs, Index m,
                                                 Index k) {
  const Index quads = int8_quads(k);
  for (Index i = 0; i < m; ++i) scales[i] = quantize_row(out + i * quads, x + i * xs, k);
}

/// A panel of int32 sums turned to floats: c = s_row · s_channel · (sum − correction).
template <int Rows, int Panels>
[[gnu::always_inline]] inline void int8_store(const Vector<std::int32_t, 64> (&acc)[Rows][Panels],
                                              const float* row_scales, const float* scales,
                                              const std::int32_t* corrections, float* c, Index cs) {
  using F = Vector<float, 64>;
  for (int p = 0; p < Panels; ++p) {
    const auto correction = vector_at<64>(corrections + p * int8_panel);
    const F scale = vector_at<64>(scales + p * int8_panel);
    for (int r = 0; r < Rows; ++r)
      vector_at<64>(c + r * cs + p * int8_panel) =
          __builtin_convertvector(acc[r][p] - correction, F) * row_scales[r] * scale;
  }
}

/// Σ_q quad q of row r · quad q of lane l of panel p, in int32 vectors: each byte of b sign-
/// extended, each of a zero-extended, four products a quad.
template <int Rows, int Panels>
[[gnu::always_inline]] inline void int8_block_in_ints(const std::uint32_t* a, Index as, const std::uint32_t* b,
                                                      Index ps, Index quads, const float* row_scales,
                                                      const float* scales, const std::int32_t* corrections,
                                                      float* c, Index cs) {
  using I = Vector<std::int32_t, 64>;
  I acc[Rows][Panels] = {};
  for (Index q = 0; q < quads; ++q) {
    I w[Panels][4];
    for (int p = 0; p < Panels; ++p) {
      const I words = vector_at<64>(reinterpret_cast<const std::int32_t*>(b + p * ps + q * int8_panel));
      for (int j = 0; j < 4; ++j) w[p][j] = (words << (24 - 8 * j)) >> 24;
    }
    for (int r = 0; r < Rows; ++r) {
      const std::uint32_t word = a[r * as + q];
      for (int j = 0; j < 4; ++j) {
        const std::int32_t u = static_cast<std::int32_t>((word >> (8 * j)) & 0xffu);
        for (int p = 0; p < Panels; ++p) acc[r][p] += u * w[p][j];
      }
    }
  }
  int8_store<Rows, Panels>(acc, row_scales, scales, corrections, c, cs);
}

// A form of the kernel: the rows and panels of its block, and whether this CPU runs it.
#define MOEKIT_INT8_FORM(Name, Label, Rows, Panels, Available, ...)                                        \
  struct Name {                                                                                            \
    static constexpr const char* name = Label;                                                             \
    static constexpr int rows = Rows, panels = Panels;                                                     \
    static bool available() { return Available; }                                                          \
    template <int R, int P>                                                                                \
    [[__VA_ARGS__]] static void block(const std::uint32_t* a, Index as, const std::uint32_t* b, Index ps,  \
                                      Index quads, const float* row_scales, const float* scales,           \
                                      const std::int32_t* corrections, float* c, Index cs) {               \
      int8_block_in_ints<R, P>(a, as, b, ps, quads, row_scales, scales, corrections, c, cs);               \
    }                                                                                                      \
    [[__VA_ARGS__]] static void quantize(std::uint32_t* out, float* scales, const float* x, Index xs,      \
                                         Index m, Index k) {                                               \
      quantize_rows(out, scales, x, xs, m, k);                                                             \
    }                                                                                                      \
  }

/// In int32 vectors of the build's width.
MOEKIT_INT8_FORM(Int8InBuildInts, "ints", 2, 1, true, gnu::noinline);

#if MOEKIT_VECTOR_DISPATCH
MOEKIT_INT8_FORM(Int8InAvx2Ints, "avx2 ints", 3, 1, __builtin_cpu_supports("avx2"), gnu::noinline,
                 gnu::target("avx2,fma"));
MOEKIT_INT8_FORM(Int8InAvx512Ints, "avx512 ints", 4, 2,
                 __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), gnu::noinline,
                 gnu::target("avx512f,avx512bw,fma"));

/// vpdpbusd: 6 rows × 4 panels, 24 sums beside the 4 loads of W and one broadcast of a row's quad.
struct Int8Dot {
  static constexpr const char* name = "avx512_vnni";
  static constexpr int rows = 6, panels = 4;
  static bool available() {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw");
  }
  template <int R, int P>
  [[gnu::noinline, gnu::target("avx512f,avx512bw,avx512vnni")]] static void block(
      const std::uint32_t* a, Index as, const std::uint32_t* b, Index ps, Index quads, const float* row_scales,
      const float* scales, const std::int32_t* corrections, float* c, Index cs) {
    // Sums of 16 int32 in GCC's own type: the intrinsic's casts through __m512i cost a copy and a
    // store of each sum every step.
    __v16si acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = __v16si{};
    for (Index q = 0; q < quads; ++q) {
      __v16si w[P];
      for (int p = 0; p < P; ++p) w[p] = reinterpret_cast<__v16si>(_mm512_loadu_si512(b + p * ps + q * int8_panel));
      for (int r = 0; r < R; ++r) {
        const auto u = reinterpret_cast<__v16si>(_mm512_set1_epi32(static_cast<int>(a[r * as + q])));
        for (int p = 0; p < P; ++p) acc[r][p] = __builtin_ia32_vpdpbusd_v16si(acc[r][p], u, w[p]);
      }
    }
    // int8_store's arithmetic, here (the sums handed on in an array would live in memory).
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) {
        const auto correction = reinterpret_cast<__v16si>(_mm512_loadu_si512(corrections + p * int8_panel));
        const auto scale = reinterpret_cast<__v16sf>(_mm512_loadu_ps(scales + p * int8_panel));
        const __v16sf out = __builtin_convertvector(acc[r][p] - correction, __v16sf) * row_scales[r] * scale;
        _mm512_storeu_ps(c + r * cs + p * int8_panel, reinterpret_cast<__m512>(out));
      }
  }
  [[gnu::noinline, gnu::target("avx512f,avx512bw,avx512vnni")]] static void quantize(
      std::uint32_t* out, float* scales, const float* x, Index xs, Index m, Index k) {
    quantize_rows(out, scales, x, xs, m, k);
  }
};
#endif
#undef MOEKIT_INT8_FORM

/// Calls f with the fastest form this CPU runs (found once): vpdpbusd where it can, else int32
/// vectors as wide as it has.
template <class F>
decltype(auto) with_int8_form(F&& f) {
#if MOEKIT_VECTOR_DISPATCH
  static const int form = Int8Dot::available()                                                   ? 3
                          : Avx512Vectors::bytes > BuildVectors::bytes && Int8InAvx512Ints::available() ? 2
                          : Avx2Vectors::bytes > BuildVectors::bytes && Int8InAvx2Ints::available()     ? 1
                                                                                                        : 0;
  if (form == 3) return std::forward<F>(f)(Int8Dot{});
  if (form == 2) return std::forward<F>(f)(Int8InAvx512Ints{});
  if (form == 1) return std::forward<F>(f)(Int8InAvx2Ints{});
#endif
  return std::forward<F>(f)(Int8InBuildInts{});
}

/// c [m,n] = rows · Wᵀ for packed operands: rows m rows of `quads` words (row stride `as`) with
/// their scales; W's panels from the first of c's columns, with its channels' scales and
/// corrections from there, in the blocks of for_each_panel_block, each over the whole sum
/// (blocks of the sum that keep the panels in L1 ran slower: the sums must then go through memory).
template <class Form>
void int8_product(Form, float* c, Index cs, Index m, Index n, const std::uint32_t* a, Index as,
                  const float* row_scales, Index quads, const std::uint32_t* panels, const float* scales,
                  const std::int32_t* corrections) {
  const Index panel_stride = quads * int8_panel;
  for_each_panel_block<Form::rows, Form::panels, int8_panel, false>(
      c, cs, m, n, [&]<int R, int P>(Index i, Index p, float* out, Index os) {
        Form::template block<R, P>(a + i * as, as, panels + p * panel_stride, panel_stride, quads, row_scales + i,
                                   scales + p * int8_panel, corrections + p * int8_panel, out, os);
      });
}

}  // namespace moekit::detail
