#pragma once
// Products on bf16 operands with float sums: c += bf16(a) · bf16(b), each operand rounded to the
// nearest bf16 (ties to even) and each pair of products added into c's float sums in turn, the
// odd element of the pair first: what the AVX512_BF16 instruction vdpbf16ps does. A CPU that runs
// it computes with it; any other runs the same arithmetic in float vectors, a product of two
// bf16 values being exact in float: the same roundings in the same order
// (docs/kernels.md#bf16).
//
// Operands are packed for the kernel: a's rows as pairs of consecutive elements along k, one
// 32-bit word a pair (the even element in the low half), and b in panels of 16 columns, each
// panel the pairs of its columns, pair by pair. The pack rounds.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#include <moekit/core/detail/bf16_bits.hpp>
#include <moekit/core/detail/vector_kernels.hpp>

#if MOEKIT_VECTOR_DISPATCH
#include <immintrin.h>
#endif

namespace moekit::detail {

/// Columns of a panel of b: one 64-byte vector of float sums.
inline constexpr Index bf16_panel = 16;

/// Pairs of k a block of the kernel sums before it goes on to the next rows of a: 128 pairs of a
/// panel are 8 KiB, so the four panels of a block (32 KiB) stay in L1 while every row of a passes.
inline constexpr Index bf16_depth = 128;

inline Index bf16_pairs(Index k) { return (k + 1) / 2; }

/// 16 floats' bits, each rounded to bf16 (to_bf16) in the low half of its lane. (In place, not
/// returned: a vector returned from a function compiled for narrower vectors changes the ABI.)
using Bf16Words = Vector<std::uint32_t, 64>;
[[gnu::always_inline]] inline void round_words(Bf16Words& bits) {
  const Bf16Words rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, quiet = (bits >> 16) | 0x40u;
  bits = (bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
}
[[gnu::always_inline]] inline void load_rounded(Bf16Words& words, const float* from) {
  words = vector_at<64>(reinterpret_cast<const std::uint32_t*>(from));
  round_words(words);
}

/// to[j] = to_bf16(from[j]) for j < count.
[[gnu::always_inline]] inline void round_to_bf16(std::uint16_t* to, const float* from, Index count) {
  Index j = 0;
  for (; j + 16 <= count; j += 16) {
    Bf16Words words;
    load_rounded(words, from + j);
    vector_at<32>(to + j) = __builtin_convertvector(words, Vector<std::uint16_t, 32>);
  }
  for (; j < count; ++j) to[j] = to_bf16(from[j]);
}

/// The calling thread's buffers: the packed operands, and 16 columns of a transposed b on their
/// way into a panel.
struct Bf16Packs {
  std::vector<std::uint32_t> rows, panels, columns;
};
inline Bf16Packs& bf16_packs() {
  thread_local Bf16Packs packs;
  return packs;
}

/// Where packed a keeps the word of pair q of row i: at i·row + q·pair.
struct Bf16Rows {
  Index row, pair;
};

/// Two rows of a matrix (row-major, stride s) as 16 words of pairs, row `first` low and the next
/// high, columns [c, c + 16); a row at or past k reads as 0.
[[gnu::always_inline]] inline void pair_rows(Bf16Words& words, const float* b, Index s, Index first, Index k, Index c) {
  Bf16Words odd{};
  load_rounded(words, b + first * s + c);
  if (first + 1 < k) load_rounded(odd, b + (first + 1) * s + c);
  words |= odd << 16;
}

/// a [m,k], a(i, j) at a[i·ar + j·ak], as pairs along k, rounded, 0 past k. A row-major a becomes
/// rows of pairs (its bf16 values in order); a transposed one (ar = 1, the weight gradients'
/// dyᵀ) pairs of its rows, m words a pair, read and written in vectors.
[[gnu::always_inline]] inline Bf16Rows pack_bf16_rows(std::uint32_t* out, const float* a, Index ar, Index ak, Index m,
                                                      Index k) {
  static_assert(std::endian::native == std::endian::little, "moekit: bf16 pairs are packed little-endian");
  const Index pairs = bf16_pairs(k);
  if (ar == 1 && ak != 1) {
    const Index whole = m / bf16_panel * bf16_panel;
    for (Index q = 0; q < pairs; ++q) {
      std::uint32_t* to = out + q * m;
      for (Index i = 0; i < whole; i += bf16_panel) {
        Bf16Words words;
        pair_rows(words, a, ak, 2 * q, k, i);
        vector_at<64>(to + i) = words;
      }
      for (Index i = whole; i < m; ++i)
        to[i] = std::uint32_t{to_bf16(a[i + 2 * q * ak])} |
                (2 * q + 1 < k ? std::uint32_t{to_bf16(a[i + (2 * q + 1) * ak])} << 16 : 0u);
    }
    return {1, m};
  }
  auto* values = reinterpret_cast<std::uint16_t*>(out);
  const Index width = 2 * pairs;
  if (ak == 1) {
    for (Index i = 0; i < m; ++i) round_to_bf16(values + i * width, a + i * ar, k);
  } else {
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < k; ++j) values[i * width + j] = to_bf16(a[i * ar + j * ak]);
  }
  if (k % 2)
    for (Index i = 0; i < m; ++i) values[i * width + k] = 0;
  return {pairs, 1};
}

/// b [k,n] in panels of bf16_panel columns, b(j, c) at b[j·bk + c·bn]: pair q of column c at
/// out[(c / 16 · pairs + q) · 16 + c % 16], columns past n 0. A row-major b (bn = 1) pairs two
/// rows in vectors; a transposed one (bk = 1: Wᵀ, whose columns are W's rows) packs 16 of its
/// columns as rows of pairs and transposes them in vectors, 16 × 16 words at a time.
[[gnu::always_inline]] inline void pack_bf16_panels(std::uint32_t* out, const float* b, Index bk, Index bn, Index k,
                                                    Index n) {
  const Index pairs = bf16_pairs(k), panels = (n + bf16_panel - 1) / bf16_panel;
  std::vector<std::uint32_t>& rows = bf16_packs().columns;
  if (bk == 1) rows.resize(static_cast<std::size_t>(bf16_panel * pairs));
  for (Index p = 0; p < panels; ++p) {
    std::uint32_t* panel = out + p * pairs * bf16_panel;
    const Index first = p * bf16_panel, lanes = std::min(bf16_panel, n - first);
    if (bk == 1) {
      pack_bf16_rows(rows.data(), b + first * bn, bn, 1, lanes, k);
      std::fill(rows.begin() + lanes * pairs, rows.end(), 0u);
      transpose_block<64>(rows.data(), pairs, bf16_panel, pairs, panel, bf16_panel);
    } else if (bn == 1 && lanes == bf16_panel) {
      for (Index q = 0; q < pairs; ++q) {
        Bf16Words words;
        pair_rows(words, b, bk, 2 * q, k, first);
        vector_at<64>(panel + q * bf16_panel) = words;
      }
    } else {
      const auto value = [&](Index j, Index c) -> std::uint32_t { return j < k ? to_bf16(b[j * bk + c * bn]) : 0u; };
      for (Index q = 0; q < pairs; ++q)
        for (Index lane = 0; lane < bf16_panel; ++lane)
          panel[q * bf16_panel + lane] =
              lane < lanes ? value(2 * q, first + lane) | value(2 * q + 1, first + lane) << 16 : 0u;
    }
  }
}

/// c[r, 16p + l] += Σ_q pair q of row r of a · pair q of lane l of panel p, for Rows rows and
/// Panels panels, in float vectors: per pair, the odd products' sum first, then the even's.
template <int Rows, int Panels>
[[gnu::always_inline]] inline void bf16_block_in_floats(const std::uint32_t* a, Bf16Rows as, const std::uint32_t* b,
                                                        Index ps, Index pairs, float* c, Index cs) {
  using F = Vector<float, 64>;
  using U = Vector<std::uint32_t, 64>;
  F acc[Rows][Panels];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Panels; ++p) acc[r][p] = vector_at<64>(c + r * cs + p * bf16_panel);
  for (Index q = 0; q < pairs; ++q) {
    F odd[Panels], even[Panels];
    for (int p = 0; p < Panels; ++p) {
      const U words = vector_at<64>(b + p * ps + q * bf16_panel);
      odd[p] = reinterpret_cast<F>(words & 0xffff0000u);
      even[p] = reinterpret_cast<F>(words << 16);
    }
    for (int r = 0; r < Rows; ++r) {
      const std::uint32_t word = a[r * as.row + q * as.pair];
      const float a_odd = std::bit_cast<float>(word & 0xffff0000u), a_even = std::bit_cast<float>(word << 16);
      for (int p = 0; p < Panels; ++p) {
        acc[r][p] += a_odd * odd[p];
        acc[r][p] += a_even * even[p];
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Panels; ++p) vector_at<64>(c + r * cs + p * bf16_panel) = acc[r][p];
}

// The packs, compiled with a form's vectors.
#define MOEKIT_BF16_PACKS(...)                                                                              \
  [[__VA_ARGS__]] static Bf16Rows pack_rows(std::uint32_t* out, const float* a, Index ar, Index ak,       \
                                            Index m, Index k) {                                             \
    return pack_bf16_rows(out, a, ar, ak, m, k);                                                            \
  }                                                                                                         \
  [[__VA_ARGS__]] static void pack_panels(std::uint32_t* out, const float* b, Index bk, Index bn, Index k, \
                                          Index n) {                                                        \
    pack_bf16_panels(out, b, bk, bn, k, n);                                                                 \
  }

// A form of the kernel: the rows and panels of its block, and whether this CPU runs it.
#define MOEKIT_BF16_FLOAT_FORM(Name, Label, Rows, Panels, Available, ...)                                   \
  struct Name {                                                                                             \
    static constexpr const char* name = Label;                                                              \
    static constexpr int rows = Rows, panels = Panels;                                                      \
    static bool available() { return Available; }                                                           \
    template <int R, int P>                                                                                 \
    [[__VA_ARGS__]] static void block(const std::uint32_t* a, Bf16Rows as, const std::uint32_t* b, Index ps,\
                                      Index pairs, float* c, Index cs) {                                    \
      bf16_block_in_floats<R, P>(a, as, b, ps, pairs, c, cs);                                               \
    }                                                                                                       \
    MOEKIT_BF16_PACKS(__VA_ARGS__)                                                                          \
  }

/// In float vectors of the build's width.
MOEKIT_BF16_FLOAT_FORM(Bf16InBuildFloats, "floats", 2, 1, true, gnu::noinline);

#if MOEKIT_VECTOR_DISPATCH
MOEKIT_BF16_FLOAT_FORM(Bf16InAvx2Floats, "avx2 floats", 4, 1,
                       __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), gnu::noinline,
                       gnu::target("avx2,fma"));
MOEKIT_BF16_FLOAT_FORM(Bf16InAvx512Floats, "avx512 floats", 6, 2,
                       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("fma"),
                       gnu::noinline, gnu::target("avx512f,avx512bw,fma"));

/// vdpbf16ps: 6 rows × 4 panels, 24 sums beside the 4 loads of b and one broadcast of a.
struct Bf16Dot {
  static constexpr const char* name = "avx512_bf16";
  static constexpr int rows = 6, panels = 4;
  static bool available() {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw");
  }
  MOEKIT_BF16_PACKS(gnu::noinline, gnu::target("avx512f,avx512bw,avx512bf16"))
  template <int R, int P>
  [[gnu::noinline, gnu::target("avx512f,avx512bf16")]] static void block(const std::uint32_t* a, Bf16Rows as,
                                                                         const std::uint32_t* b, Index ps,
                                                                         Index pairs, float* c, Index cs) {
    __m512 acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_loadu_ps(c + r * cs + p * bf16_panel);
    for (Index q = 0; q < pairs; ++q) {
      __m512bh bv[P];
      for (int p = 0; p < P; ++p) bv[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ps + q * bf16_panel));
      for (int r = 0; r < R; ++r) {
        const auto av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * as.row + q * as.pair])));
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, bv[p]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) _mm512_storeu_ps(c + r * cs + p * bf16_panel, acc[r][p]);
  }
};
#endif
#undef MOEKIT_BF16_FLOAT_FORM
#undef MOEKIT_BF16_PACKS

/// c += a · b from packed operands (a: m rows of `pairs` words laid out as `as` says; b: panels
/// covering n columns), by
/// the given form: blocks of bf16_depth pairs, in each the blocks of for_each_panel_block. Each
/// sum runs over the pairs in order, so the bits depend on neither the blocks nor the form.
template <class Form>
void bf16_product(Form, float* c, Index cs, Index m, Index n, const std::uint32_t* a, Bf16Rows as, Index pairs,
                  const std::uint32_t* b) {
  const Index panel_stride = pairs * bf16_panel;
  for (Index q = 0; q < pairs; q += bf16_depth) {
    const Index depth = std::min(bf16_depth, pairs - q);
    for_each_panel_block<Form::rows, Form::panels, bf16_panel, true>(
        c, cs, m, n, [&]<int R, int P>(Index i, Index p, float* out, Index os) {
          Form::template block<R, P>(a + i * as.row + q * as.pair, as, b + p * panel_stride + q * bf16_panel,
                                     panel_stride, depth, out, os);
        });
  }
}

/// Calls f with the fastest form this CPU runs (found once): vdpbf16ps where it can, else float
/// vectors as wide as it has.
template <class F>
decltype(auto) with_bf16_form(F&& f) {
#if MOEKIT_VECTOR_DISPATCH
  static const int form = Bf16Dot::available()                                                   ? 3
                          : Avx512Vectors::bytes > BuildVectors::bytes && Bf16InAvx512Floats::available() ? 2
                          : Avx2Vectors::bytes > BuildVectors::bytes && Bf16InAvx2Floats::available()     ? 1
                                                                                                          : 0;
  if (form == 3) return std::forward<F>(f)(Bf16Dot{});
  if (form == 2) return std::forward<F>(f)(Bf16InAvx512Floats{});
  if (form == 1) return std::forward<F>(f)(Bf16InAvx2Floats{});
#endif
  return std::forward<F>(f)(Bf16InBuildFloats{});
}

/// c[i] += bf16(a) · bf16(b[i]) with float sums for each i < count, c[i] row-major [m,n] (row
/// stride cs), a(r, j) at a[r·ar + j·ak] and b[i](j, c) at b[i][j·bk + c·bn] over k, by the form
/// given (bf16_product) or the fastest this CPU runs. a is packed once for all of them.
template <class Form>
void bf16_gemm_add(Form form, float* const* c, Index cs, Index m, Index n, const float* a, Index ar, Index ak,
                   const float* const* b, Index bk, Index bn, Index k, std::size_t count) {
  if (m == 0 || n == 0 || k == 0) return;
  Bf16Packs& packs = bf16_packs();
  const Index pairs = bf16_pairs(k);
  packs.rows.resize(static_cast<std::size_t>(m * pairs));
  packs.panels.resize(static_cast<std::size_t>((n + bf16_panel - 1) / bf16_panel * bf16_panel * pairs));
  const Bf16Rows as = Form::pack_rows(packs.rows.data(), a, ar, ak, m, k);
  for (std::size_t i = 0; i < count; ++i) {
    Form::pack_panels(packs.panels.data(), b[i], bk, bn, k, n);
    bf16_product(form, c[i], cs, m, n, packs.rows.data(), as, pairs, packs.panels.data());
  }
}
template <class Form>
void bf16_gemm_add(Form form, float* c, Index cs, Index m, Index n, const float* a, Index ar, Index ak,
                   const float* b, Index bk, Index bn, Index k) {
  bf16_gemm_add(form, &c, cs, m, n, a, ar, ak, &b, bk, bn, k, 1);
}
inline void bf16_gemm_add(float* const* c, Index cs, Index m, Index n, const float* a, Index ar, Index ak,
                          const float* const* b, Index bk, Index bn, Index k, std::size_t count) {
  with_bf16_form([&](auto form) { bf16_gemm_add(form, c, cs, m, n, a, ar, ak, b, bk, bn, k, count); });
}
inline void bf16_gemm_add(float* c, Index cs, Index m, Index n, const float* a, Index ar, Index ak, const float* b,
                          Index bk, Index bn, Index k) {
  bf16_gemm_add(&c, cs, m, n, a, ar, ak, &b, bk, bn, k, 1);
}

}  // namespace moekit::detail
