#pragma once
// Two products in the widest vectors the CPU has, for gemm_add:
// - times_wt, x · Wᵀ by dot products of rows: the experts' product at decode, where each weight
//   read from memory serves a few multiply-adds, so the product must stream the weights and do its
//   arithmetic as fast as they come (packing W for a GEMM kernel would read it once more);
// - times_b, a · B by broadcasts into rows of B, for the backward's products, and for the forward's
//   over slabs of Wᵀ that each form's transpose lays out, or turned, W · xᵀ over x transposed.
//
// The kernels are written once, over the vector extensions GCC and Clang share, and compiled for
// the build's own vectors and, on x86, for AVX2 and AVX-512 too: a build for any x86-64 CPU
// (SSE2, Debian's default) runs the widest vectors the CPU has, chosen once at run time. With
// SSE2 alone the arithmetic takes longer than reading the weights (docs/kernels.md#decode-kernel).
// Eigen's GEMM keeps to the build's vectors, so on a CPU whose vectors are wider the kernels beat
// it at any size, and gemm_add sends them every product they take (docs/kernels.md#wider-vectors).
// Define MOEKIT_VECTOR_DISPATCH to 0 to keep to the build's vectors, so that one binary gives the
// same bits on every CPU it runs on.
#include <Eigen/Core>

#include <algorithm>
#include <bit>
#include <cstring>
#include <tuple>
#include <utility>

#include <moekit/core/tensor.hpp>

#ifndef MOEKIT_VECTOR_DISPATCH
#if defined(__x86_64__) || defined(__i386__)
#define MOEKIT_VECTOR_DISPATCH 1
#else
#define MOEKIT_VECTOR_DISPATCH 0
#endif
#endif
#if MOEKIT_VECTOR_DISPATCH && !(defined(__x86_64__) || defined(__i386__))
#error "MOEKIT_VECTOR_DISPATCH=1 chooses among x86 vector extensions; this is not an x86 target"
#endif

namespace moekit::detail {

/// Up to this many rows, a product of row-major rows with a transposed row-major matrix (the
/// experts' x · Wᵀ at decode) goes to times_wt, not to a GEMM: up to here the kernel is the
/// faster in every build measured (docs/kernels.md#decode-kernel).
inline constexpr Index few_rows = 32;

/// How far ahead of its loads the kernel prefetches each row of w, in bytes. The hardware
/// prefetcher stops at each 4 KiB page, and a row of 1024 floats is one, so each row's prefetch
/// runs on into the row that takes its place in the next block; 2 KiB is the distance that
/// streamed fastest (docs/kernels.md#decode-kernel).
inline constexpr Index prefetch_ahead_bytes = 2048;

/// Bytes / sizeof(T) lanes of T, and the same read from anywhere a T may be (unaligned, aliasing).
template <class T, int Bytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(Bytes)));
  typedef T unaligned __attribute__((vector_size(Bytes), aligned(alignof(T)), may_alias));
};
template <class T, int Bytes>
using Vector = typename VectorOf<T, Bytes>::type;

/// The vector at p (a reference: a vector returned by value from a function compiled for the
/// build's vectors would change the ABI).
template <int Bytes, class T>
[[gnu::always_inline]] inline const typename VectorOf<T, Bytes>::unaligned& vector_at(const T* p) {
  return *reinterpret_cast<const typename VectorOf<T, Bytes>::unaligned*>(p);
}
template <int Bytes, class T>
[[gnu::always_inline]] inline typename VectorOf<T, Bytes>::unaligned& vector_at(T* p) {
  return *reinterpret_cast<typename VectorOf<T, Bytes>::unaligned*>(p);
}

// The helpers below take vectors by reference and are always inlined: into a function compiled
// for wider vectors than the build's, they become that function's instructions.

/// The sum of v's lanes, halving: (v₀ + v₂) + (v₁ + v₃) for four lanes, as Eigen's predux.
template <class T, int Bytes>
[[gnu::always_inline]] inline T sum_of_lanes(const Vector<T, Bytes>& v) {
  if constexpr (Bytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    using Half = Vector<T, Bytes / 2>;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    const Half halves = low + high;
    return sum_of_lanes<T, Bytes / 2>(halves);
  }
}

/// acc[r][c] += the next vector of row r of x times that of row c of w, each vector of w loaded
/// once for all the rows; row c of w is prefetched at ahead_of_row0 + c·ws.
template <int Bytes, int Rows, int Cols, class T>
[[gnu::always_inline]] inline void dot_step(Vector<T, Bytes> (&acc)[Rows][Cols], const T* x, Index xs, const T* w,
                                            Index ws, const T* ahead_of_row0) {
  Vector<T, Bytes> wv[Cols];
  for (int c = 0; c < Cols; ++c) {
    wv[c] = vector_at<Bytes>(w + c * ws);
    __builtin_prefetch(ahead_of_row0 + c * ws);
  }
  for (int r = 0; r < Rows; ++r) {
    const Vector<T, Bytes> xv = vector_at<Bytes>(x + r * xs);
    for (int c = 0; c < Cols; ++c) acc[r][c] += xv * wv[c];
  }
}

/// out[r][c] = Σ_k x[r·xs + k] · w[c·ws + k] for Rows rows of x and Cols rows of w, from
/// registers. The sum over k runs in vector lanes and then across them, the same order whatever
/// the other rows are.
template <int Bytes, int Rows, int Cols, class T>
[[gnu::always_inline]] inline void dot_block(const T* x, Index xs, const T* w, Index ws, Index k,
                                             T (&out)[Rows][Cols]) {
  constexpr Index lanes = Bytes / Index{sizeof(T)}, ahead = prefetch_ahead_bytes / Index{sizeof(T)};
  Vector<T, Bytes> acc[Rows][Cols];  // zeroed one by one: `= {}` became a rep stos on the stack
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = Vector<T, Bytes>{};
  Index i = 0;
  for (; i + lanes <= k && i + ahead < k; i += lanes) dot_step<Bytes>(acc, x + i, xs, w + i, ws, w + i + ahead);
  for (; i + lanes <= k; i += lanes)  // prefetching into the next block's rows
    dot_step<Bytes>(acc, x + i, xs, w + i, ws, w + Cols * ws + (i + ahead - k));
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) {
      T sum = sum_of_lanes<T, Bytes>(acc[r][c]);
      for (Index j = i; j < k; ++j) sum += x[r * xs + j] * w[c * ws + j];
      out[r][c] = sum;
    }
}

/// broadcast_block's sums, added into c; with Copying, each vector of b read is also stored in
/// copy, in rows of Cols vectors (times_b's copy of a panel). Compiled once with the copy and once
/// without, so that the loop without it tests nothing. A function, not a lambda: GCC 12 left a
/// lambda here out of line, always_inline or not, and the products slowed.
template <int Bytes, int Rows, int Cols, bool Copying, class T>
[[gnu::always_inline]] inline void broadcast_sums(const T* a, Index ar, Index ak, const T* b, Index bs, Index k,
                                                  T* c, Index cs, T* copy) {
  constexpr Index lanes = Bytes / Index{sizeof(T)}, line = 64 / Index{sizeof(T)};
  Vector<T, Bytes> acc[Rows][Cols] = {};
  for (Index i = 0; i < k; ++i) {
    if (ak == 1 && i % line == 0)
      for (int r = 0; r < Rows; ++r) __builtin_prefetch(a + (Rows + r) * ar + i);
    Vector<T, Bytes> bv[Cols];
    for (int q = 0; q < Cols; ++q) bv[q] = vector_at<Bytes>(b + i * bs + q * lanes);
    if constexpr (Copying)
      for (int q = 0; q < Cols; ++q) vector_at<Bytes>(copy + (i * Cols + q) * lanes) = bv[q];
    for (int r = 0; r < Rows; ++r) {
      const T ari = a[r * ar + i * ak];
      for (int q = 0; q < Cols; ++q) acc[r][q] += ari * bv[q];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int q = 0; q < Cols; ++q) vector_at<Bytes>(c + r * cs + q * lanes) += acc[r][q];
}

/// c[r, vector q] += Σ_i a(r, i) · vector q of row i of b, for Rows rows and Cols vectors of
/// columns, with a(r, i) at a[r·ar + i·ak]: a row-major a (ar its stride, ak 1) or a transposed
/// one (ar 1, ak its stride). Each column's sum runs over i in order, from registers, whatever
/// the other rows and columns are. The block's lines of c are prefetched before its sums start:
/// a weight gradient lies in memory, not cache, and each block adds into it after only an
/// expert's few rows of sums, so loading c when the sums end left each block waiting on memory
/// (docs/kernels.md#gradient-prefetch). A row-major a is streamed, turned, from a weight in
/// memory, Rows short rows at a time, too short for the hardware's prefetcher to reach its
/// stride before the next block starts cold on the next rows: so each line of a read also
/// prefetches that line of the next block's rows (docs/kernels.md#turned-prefetch). Given a
/// copy, b is copied there as it is
/// read (broadcast_sums).
template <int Bytes, int Rows, int Cols, class T>
[[gnu::always_inline]] inline void broadcast_block(const T* a, Index ar, Index ak, const T* b, Index bs, Index k,
                                                   T* c, Index cs, T* copy) {
  constexpr Index lanes = Bytes / Index{sizeof(T)};
  for (int r = 0; r < Rows; ++r)
    for (int q = 0; q < Cols; ++q) __builtin_prefetch(c + r * cs + q * lanes, /*for writing*/ 1);
  if (k <= 0) return;  // so that the partial sums live only in registers: GCC 12 otherwise zeroed
                       // a copy of them on the stack (rep stos) for the loop that never ran
  if (copy)
    broadcast_sums<Bytes, Rows, Cols, true>(a, ar, ak, b, bs, k, c, cs, copy);
  else
    broadcast_sums<Bytes, Rows, Cols, false>(a, ar, ak, b, bs, k, c, cs, copy);
}

/// One stage of a transpose in registers: rows x and y, `Block` rows apart, trade their
/// off-diagonal blocks of Block lanes (x takes y's first block of each pair, y takes x's second).
template <int Block, class V, int... J>
[[gnu::always_inline]] inline void swap_blocks(V& x, V& y, std::integer_sequence<int, J...>) {
  constexpr int lanes = sizeof...(J);
  const V a = x, b = y;
  x = __builtin_shufflevector(a, b, ((J & Block) ? lanes + J - Block : J)...);
  y = __builtin_shufflevector(a, b, ((J & Block) ? lanes + J : J + Block)...);
}

/// slab[i·ss + j] = w[j·ws + i] for j < n rows of w and i < depth: squares of lanes × lanes loaded
/// as rows of vectors, transposed in registers (log₂ lanes stages of swap_blocks) and stored as
/// rows of the slab; the edges that fill no square element by element. A copy: no arithmetic.
template <int Bytes, class T>
[[gnu::always_inline]] inline void transpose_block(const T* w, Index ws, Index n, Index depth, T* slab, Index ss) {
  constexpr int lanes = Bytes / int{sizeof(T)};
  using V = Vector<T, Bytes>;
  const Index whole_n = n / lanes * lanes, whole_depth = depth / lanes * lanes;
  for (Index j = 0; j < whole_n; j += lanes)
    for (Index i = 0; i < whole_depth; i += lanes) {
      V r[lanes];
      for (int q = 0; q < lanes; ++q) r[q] = vector_at<Bytes>(w + (j + q) * ws + i);
      [&]<int... S>(std::integer_sequence<int, S...>) {
        ([&] {
          constexpr int block = lanes >> (S + 1);
          for (int q = 0; q < lanes; ++q)
            if (!(q & block)) swap_blocks<block>(r[q], r[q + block], std::make_integer_sequence<int, lanes>{});
        }(), ...);
      }(std::make_integer_sequence<int, std::bit_width(unsigned(lanes)) - 1>{});
      for (int q = 0; q < lanes; ++q) vector_at<Bytes>(slab + (i + q) * ss + j) = r[q];
    }
  for (Index i = 0; i < depth; ++i) {  // the edges: rows of w past whole_n, depth past whole_depth
    for (Index j = whole_n; j < n; ++j) slab[i * ss + j] = w[j * ws + i];
    if (i >= whole_depth)
      for (Index j = 0; j < whole_n; ++j) slab[i * ss + j] = w[j * ws + i];
  }
}

/// A form of the kernels: Form's width in bytes and number of vector registers, its name, whether
/// this CPU runs it, and dot_block, broadcast_block and transpose_block compiled with the given
/// attributes. One macro writes every form, as GCC's target attribute takes only a string literal.
/// dot, broadcast and transpose are never inlined: they are where the instructions change, and
/// inlined where the depth is a constant, GCC 12 kept the partial sums in memory, not registers.
#define MOEKIT_VECTOR_FORM(Form, Bytes, Registers, Name, Available, ...)                                         \
  struct Form {                                                                                                  \
    static constexpr int bytes = Bytes, registers = Registers;                                                   \
    static constexpr const char* name = Name;                                                                    \
    static bool available() { return Available; }                                                                \
    template <int Rows, int Cols, class T>                                                                       \
    [[__VA_ARGS__]] static void dot(const T* x, Index xs, const T* w, Index ws, Index k, T (&out)[Rows][Cols]) { \
      dot_block<bytes>(x, xs, w, ws, k, out);                                                                    \
    }                                                                                                            \
    template <int Rows, int Cols, class T>                                                                       \
    [[__VA_ARGS__]] static void broadcast(const T* a, Index ar, Index ak, const T* b, Index bs, Index k, T* c,    \
                                          Index cs, T* copy) {                                                   \
      broadcast_block<bytes, Rows, Cols>(a, ar, ak, b, bs, k, c, cs, copy);                                      \
    }                                                                                                            \
    template <class T>                                                                                           \
    [[__VA_ARGS__]] static void transpose(const T* w, Index ws, Index n, Index depth, T* slab, Index ss) {       \
      transpose_block<bytes>(w, ws, n, depth, slab, ss);                                                         \
    }                                                                                                            \
  }

/// The build's own vectors (Eigen's packets; at least 16 bytes).
MOEKIT_VECTOR_FORM(BuildVectors, (std::max<int>(16, sizeof(Eigen::internal::packet_traits<float>::type))),
                   EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS, "build", true, gnu::noinline);

#if MOEKIT_VECTOR_DISPATCH
/// AVX2 with FMA: 32-byte vectors, 16 registers.
MOEKIT_VECTOR_FORM(Avx2Vectors, 32, 16, "avx2", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                   gnu::noinline, gnu::target("avx2,fma"));
/// AVX-512F: 64-byte vectors, 32 registers.
MOEKIT_VECTOR_FORM(Avx512Vectors, 64, 32, "avx512",
                   __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"), gnu::noinline,
                   gnu::target("avx512f,fma"));

/// Every form this build has, narrowest first.
using VectorForms = std::tuple<BuildVectors, Avx2Vectors, Avx512Vectors>;
#else
using VectorForms = std::tuple<BuildVectors>;
#endif
#undef MOEKIT_VECTOR_FORM

/// Calls f with the widest form this CPU runs (found once); a form no wider than the build's
/// vectors is never chosen over them.
template <class F>
decltype(auto) with_widest_vectors(F&& f) {
#if MOEKIT_VECTOR_DISPATCH
  static const int widest = Avx512Vectors::bytes > BuildVectors::bytes && Avx512Vectors::available() ? 512
                            : Avx2Vectors::bytes > BuildVectors::bytes && Avx2Vectors::available() ? 256
                                                                                                    : 0;
  if (widest == 512) return std::forward<F>(f)(Avx512Vectors{});
  if (widest == 256) return std::forward<F>(f)(Avx2Vectors{});
#endif
  return std::forward<F>(f)(BuildVectors{});
}

/// Whether this CPU runs a wider form of the kernels than the build's vectors. Eigen's GEMM keeps
/// to the build's vectors, so the kernels are then the faster products at any size
/// (docs/kernels.md#wider-vectors).
inline bool runs_wider_than_build() {
  return with_widest_vectors([](auto vectors) { return decltype(vectors)::bytes > BuildVectors::bytes; });
}

/// Bytes of the widest vectors the kernels run on this CPU (the build's, with dispatch off).
inline int widest_vector_bytes() {
  return with_widest_vectors([](auto vectors) { return decltype(vectors)::bytes; });
}

/// f.template operator()<N>() for N = count, 1 ≤ count ≤ Max: a block's rows or a panel's
/// vectors, known only at run time, as the template argument that keeps the partial sums in
/// registers.
template <int Max, class F>
void with_count(Index count, F&& f) {
  [&]<int... N>(std::integer_sequence<int, N...>) {
    (void)((count == N + 1 && (f.template operator()<N + 1>(), true)) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

/// The blocks of a packed product over c [m, n], its columns in panels of Width: for each group
/// of at most Panels whole panels, every group of at most Rows rows passes over it, as
/// block.template operator()<R, P>(row, panel, out, out_stride) with out = c at (row, panel).
/// A last panel that c does not fill goes through a block of its own on a zero-padded copy of
/// its columns (c's values first where the block Accumulates), written back after.
template <int Rows, int Panels, Index Width, bool Accumulates, class Block>
void for_each_panel_block(float* c, Index cs, Index m, Index n, Block&& block) {
  const Index whole = n / Width, left = n % Width;
  for (Index p = 0; p < whole; p += Panels)
    with_count<Panels>(std::min<Index>(Panels, whole - p), [&]<int P>() {
      for (Index i = 0; i < m; i += Rows)
        with_count<Rows>(std::min<Index>(Rows, m - i),
                         [&]<int R>() { block.template operator()<R, P>(i, p, c + i * cs + p * Width, cs); });
    });
  if (left == 0) return;
  float* const last = c + whole * Width;
  float edge[Rows * Width];
  for (Index i = 0; i < m; i += Rows)
    with_count<Rows>(std::min<Index>(Rows, m - i), [&]<int R>() {
      for (int r = 0; r < R; ++r)
        for (Index l = 0; l < Width; ++l) edge[r * Width + l] = Accumulates && l < left ? last[(i + r) * cs + l] : 0.0f;
      block.template operator()<R, 1>(i, whole, edge, Width);
      for (int r = 0; r < R; ++r)
        for (Index l = 0; l < left; ++l) last[(i + r) * cs + l] = edge[r * Width + l];
    });
}

/// Rows of x the kernel takes at once, each weight it loads serving all of them. With 32 vector
/// registers, six rows by four rows of w keep 24 partial sums beside the loads (seven or eight
/// rows, in blocks of three or two rows of w, streamed slower than 4 + 3 and 4 + 4 with
/// AVX-512); with 16 registers, four (docs/kernels.md#decode-kernel).
template <class Vectors>
inline constexpr int times_wt_group = Vectors::registers >= 32 ? 6 : 4;

/// c[·, first … first+width) += Rows rows of x times those rows of w, transposed.
template <class Vectors, int Rows, class T, class C>
void times_wt_block(C& c, Index row, const T* x, Index xs, const T* w, Index ws, Index first, Index width, Index k) {
  // Rows of w a block takes: eight partial sums or more to hide the latency of the adds, no more
  // than the registers hold beside the loads. One or two rows of x take four rows of w with 16
  // registers and eight with 32, more rows of x two and four: the counts that streamed fastest
  // (docs/kernels.md#decode-kernel). A row's sums are the same whichever block it is in.
  constexpr bool many_registers = Vectors::registers >= 32;
  constexpr int cols = Rows <= 2 ? (many_registers ? 8 : 4) : (many_registers ? 4 : 2);
  Index j = first;
  for (; j + cols <= first + width; j += cols) {
    T out[Rows][cols];
    Vectors::template dot<Rows, cols>(x, xs, w + j * ws, ws, k, out);
    for (int r = 0; r < Rows; ++r)
      for (int q = 0; q < cols; ++q) c(row + r, j + q) += out[r][q];
  }
  for (; j < first + width; ++j) {
    T out[Rows][1];
    Vectors::template dot<Rows, 1>(x, xs, w + j * ws, ws, k, out);
    for (int r = 0; r < Rows; ++r) c(row + r, j) += out[r][0];
  }
}

/// c += x · wᵀ for m ≤ few_rows rows x [m,k] and w [n,k], both with rows contiguous, with the
/// given form of the kernel. The rows go times_wt_group at a time over 128 KiB slices of w, so
/// that w comes from memory once and from cache for the next group.
template <class Vectors, class T, class C>
void times_wt(Vectors, C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n, Index k) {
  constexpr int group = times_wt_group<Vectors>;
  // Whole blocks of w's rows (up to 8 a block): a row left over would go alone, its sum one chain
  // of adds (docs/kernels.md#decode-slices).
  const Index slice = std::max<Index>(16, Index{128 << 10} / (k * Index{sizeof(T)}) / 8 * 8);
  for (Index j = 0; j < n; j += slice)
    for (Index i = 0; i < m; i += group)
      with_count<group>(std::min<Index>(group, m - i), [&]<int Rows>() {
        times_wt_block<Vectors, Rows>(c, i, x + i * xs, xs, w, ws, j, std::min(slice, n - j), k);
      });
}

/// c += x · wᵀ, with the widest form of the kernel this CPU runs.
template <class T, class C>
void times_wt(C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n, Index k) {
  with_widest_vectors([&](auto vectors) { times_wt(vectors, c, x, xs, m, w, ws, n, k); });
}

/// Rows of b's panel a broadcast block takes before adding its sums into c: a panel of 256 rows
/// of four 64-byte vectors (64 KiB) stays in cache while every block of rows of a passes over it,
/// where a whole panel of a deep product does not (docs/kernels.md#wider-vectors).
inline constexpr Index broadcast_depth = 256;

/// Rows of a and vectors of b's columns a broadcast block takes: 6 × 4 with 32 registers, 4 × 3
/// with 16, partial sums beside the loads of b and one broadcast: the shapes that ran fastest of
/// those that fit (docs/kernels.md#wider-vectors).
template <class Vectors>
inline constexpr int broadcast_rows = Vectors::registers >= 32 ? 6 : 4;
template <class Vectors>
inline constexpr int broadcast_vectors = Vectors::registers >= 32 ? 4 : 3;

/// Elements of the copy of a panel of b that times_b keeps for a transposed a, in any form.
template <class T>
inline constexpr Index panel_copy_size = []<class... Form>(std::tuple<Form...>*) {
  return std::max({broadcast_depth * broadcast_vectors<Form> * Form::bytes / Index{sizeof(T)}...});
}(static_cast<VectorForms*>(nullptr));

/// c += a · b for b [k,n] and c [m,n] with rows contiguous and a(r, i) at a[r·ar + i·ak], with the
/// given form of the kernel: by panels of columns, each in blocks of broadcast_depth rows of b
/// that every group of rows of a passes over. Each sum runs in a fixed order set by k alone, each
/// block of broadcast_depth added into c in turn: times_b over consecutive blocks of k gives the
/// same bits.
///
/// Given panel_copy (panel_copy_size elements), with a transposed a (the weight gradients, dyᵀ · x)
/// the first group of rows copies each block of the panel as it reads it, its rows contiguous,
/// and the other groups read the copy. b is then an activation read down its rows, a row's
/// length apart: at E = 64, 64 rows deep, a block's rows fell into a few sets of the L1 cache and
/// pushed each other out, where the copy stays (docs/kernels.md#panel-copy). With a row-major a
/// (the input gradients) b is a weight, read from memory once whatever is done with it, so it is
/// read where it lies. The copy holds the same values,
/// so the bits are the same.
template <class Vectors, class T>
void times_b(Vectors, T* c, Index cs, const T* a, Index ar, Index ak, Index m, const T* b, Index bs, Index n,
             Index k, T* panel_copy = nullptr) {
  constexpr int group = broadcast_rows<Vectors>, cols = broadcast_vectors<Vectors>;
  constexpr Index lanes = Vectors::bytes / Index{sizeof(T)};
  const auto panel = [&]<int Cols>(Index j) {
    constexpr Index width = Cols * lanes;
    const bool copied = panel_copy && ak != 1 && bs != width && m > group;
    for (Index p = 0; p < k; p += broadcast_depth)
      for (Index i = 0; i < m; i += group)
        with_count<group>(std::min<Index>(group, m - i), [&]<int Rows>() {
          const bool from_copy = copied && i > 0;
          Vectors::template broadcast<Rows, Cols>(a + i * ar + p * ak, ar, ak, from_copy ? panel_copy : b + p * bs + j,
                                                  from_copy ? width : bs, std::min(broadcast_depth, k - p),
                                                  c + i * cs + j, cs, copied && i == 0 ? panel_copy : nullptr);
        });
  };
  // Panels of `cols` vectors, then one of the vectors left. One vector left over borrows one
  // from the last whole panel (4 + 1 → 3 + 2): a block a vector wide has too few partial sums to
  // hide the adds' latency, and turned, where b's columns are an expert's rows, it took a
  // fifth of the time for a tenth of the arithmetic (docs/kernels.md#panel-tail).
  const Index vectors = n / lanes;
  Index whole = vectors / cols;
  if (vectors % cols == 1 && whole > 0) --whole;
  Index j = 0;
  for (Index p = 0; p < whole; ++p, j += cols * lanes) panel.template operator()<cols>(j);
  if (const Index left = vectors - whole * cols; left > cols) {
    panel.template operator()<cols - 1>(j);
    panel.template operator()<2>(j + (cols - 1) * lanes);
    j += left * lanes;
  } else if (left > 0) {
    with_count<cols - 1>(left, [&]<int Cols>() { panel.template operator()<Cols>(j); });
    j += left * lanes;
  }
  for (; j < n; ++j)  // the last columns, fewer than a vector, in the same blocks of b's rows
    for (Index p = 0; p < k; p += broadcast_depth)
      for (Index i = 0; i < m; ++i) {
        T sum = 0;
        for (Index q = p; q < std::min(p + broadcast_depth, k); ++q) sum += a[i * ar + q * ak] * b[q * bs + j];
        c[i * cs + j] += sum;
      }
}

/// c += a · b, with the widest form of the kernel this CPU runs.
template <class T>
void times_b(T* c, Index cs, const T* a, Index ar, Index ak, Index m, const T* b, Index bs, Index n, Index k,
             T* panel_copy = nullptr) {
  with_widest_vectors([&](auto vectors) { times_b(vectors, c, cs, a, ar, ak, m, b, bs, n, k, panel_copy); });
}

}  // namespace moekit::detail
