#pragma once
// x · Wᵀ for a few rows x: the experts' product at decode, where each weight read from memory
// serves a few multiply-adds, so the product must stream the weights and do its arithmetic as
// fast as they come. Packing W for a GEMM kernel would read it once more than the product does.
//
// The kernel is written once, over the vector extensions GCC and Clang share, and compiled for
// the build's own vectors and, on x86, for AVX2 and AVX-512 too: a build for any x86-64 CPU
// (SSE2, Debian's default) runs the widest vectors the CPU has, chosen once at run time. With
// SSE2 alone the arithmetic takes longer than reading the weights (docs/performance.md#decode-kernel).
// On a CPU whose vectors are wider than the build's, the kernel beats Eigen's GEMM, which keeps to
// the build's, at any number of rows, and gemm_add sends it every x · Wᵀ.
// Define MOEKIT_DECODE_DISPATCH to 0 to keep to the build's vectors, so that one binary gives the
// same bits on every CPU it runs on.
#include <Eigen/Core>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>

#include <moekit/core/tensor.hpp>

#ifndef MOEKIT_DECODE_DISPATCH
#if defined(__x86_64__) || defined(__i386__)
#define MOEKIT_DECODE_DISPATCH 1
#else
#define MOEKIT_DECODE_DISPATCH 0
#endif
#endif
#if MOEKIT_DECODE_DISPATCH && !(defined(__x86_64__) || defined(__i386__))
#error "MOEKIT_DECODE_DISPATCH=1 chooses among x86 vector extensions; this is not an x86 target"
#endif

namespace moekit::detail {

/// Up to this many rows, a product of row-major rows with a transposed row-major matrix (the
/// experts' x · Wᵀ at decode) goes to few_rows_times_wt, not to a GEMM.
/// benchmarks/decode_kernel_benchmark finds the kernel as fast as Eigen's GEMM or faster up to 32
/// rows, with SSE2 and AVX-512, and the layer at T = 64 (the busiest expert 19–25 rows) 6–15%
/// faster with 32 here than with 16; past 32 rows neither measurement found a steady gain
/// (docs/performance.md#decode-kernel).
inline constexpr Index few_rows = 32;

/// How far ahead of its loads the kernel prefetches each row of w, in bytes. The hardware
/// prefetcher stops at each 4 KiB page, and a row of 1024 floats is one, so each row's prefetch
/// runs on into the row that takes its place in the next block. 2 KiB ahead streamed 20–30%
/// faster than a whole row ahead (the next block's row at the same place), and 512 B was too
/// close (docs/performance.md#decode-kernel).
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
  Vector<T, Bytes> acc[Rows][Cols] = {};
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

// The kernel's forms. Each gives the width and number of its vector registers, whether this CPU
// runs it, and dot_block compiled for it. dot is never inlined: it is where the instructions
// change, and inlined where the depth is a constant, GCC 12 kept the partial sums in memory, not
// registers (2.3× slower).

/// The build's own vectors (Eigen's packets; at least 16 bytes).
struct BuildVectors {
  static constexpr int bytes = std::max<int>(16, sizeof(Eigen::internal::packet_traits<float>::type));
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  static constexpr const char* name = "build";
  static bool available() { return true; }
  template <int Rows, int Cols, class T>
  [[gnu::noinline]] static void dot(const T* x, Index xs, const T* w, Index ws, Index k, T (&out)[Rows][Cols]) {
    dot_block<bytes>(x, xs, w, ws, k, out);
  }
};

#if MOEKIT_DECODE_DISPATCH
/// AVX2 with FMA: 32-byte vectors, 16 registers.
struct Avx2Vectors {
  static constexpr int bytes = 32, registers = 16;
  static constexpr const char* name = "avx2";
  static bool available() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
  template <int Rows, int Cols, class T>
  [[gnu::noinline, gnu::target("avx2,fma")]] static void dot(const T* x, Index xs, const T* w, Index ws, Index k,
                                                             T (&out)[Rows][Cols]) {
    dot_block<bytes>(x, xs, w, ws, k, out);
  }
};

/// AVX-512F: 64-byte vectors, 32 registers.
struct Avx512Vectors {
  static constexpr int bytes = 64, registers = 32;
  static constexpr const char* name = "avx512";
  static bool available() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }
  template <int Rows, int Cols, class T>
  [[gnu::noinline, gnu::target("avx512f,fma")]] static void dot(const T* x, Index xs, const T* w, Index ws,
                                                                Index k, T (&out)[Rows][Cols]) {
    dot_block<bytes>(x, xs, w, ws, k, out);
  }
};

/// Every form this build has, narrowest first.
using DecodeForms = std::tuple<BuildVectors, Avx2Vectors, Avx512Vectors>;
#else
using DecodeForms = std::tuple<BuildVectors>;
#endif

/// Calls f with the widest form this CPU runs (found once); a form no wider than the build's
/// vectors is never chosen over them.
template <class F>
decltype(auto) with_decode_vectors(F&& f) {
#if MOEKIT_DECODE_DISPATCH
  static const int widest = Avx512Vectors::bytes > BuildVectors::bytes && Avx512Vectors::available() ? 512
                            : Avx2Vectors::bytes > BuildVectors::bytes && Avx2Vectors::available() ? 256
                                                                                                    : 0;
  if (widest == 512) return std::forward<F>(f)(Avx512Vectors{});
  if (widest == 256) return std::forward<F>(f)(Avx2Vectors{});
#endif
  return std::forward<F>(f)(BuildVectors{});
}

/// Whether this CPU runs a wider form of the kernel than the build's vectors. Eigen's GEMM keeps to
/// the build's vectors, so the kernel is then the faster product at any number of rows: in a
/// build for any x86-64 CPU, on a CPU with AVX-512, 3× faster at the layer's 256-row tiles
/// (docs/performance.md#decode-kernel).
inline bool runs_wider_than_build() {
  return with_decode_vectors([](auto vectors) { return decltype(vectors)::bytes > BuildVectors::bytes; });
}

/// Rows of x the kernel takes at once, each weight it loads serving all of them. With 32 vector
/// registers, six rows by four rows of w keep 24 partial sums beside the loads (seven or eight
/// rows, in blocks of three or two rows of w, streamed slower than 4 + 3 and 4 + 4 with
/// AVX-512); with 16 registers, four (docs/performance.md#decode-kernel).
template <class Vectors>
inline constexpr int few_rows_group = Vectors::registers >= 32 ? 6 : 4;

/// c[·, first … first+width) += Rows rows of x times those rows of w, transposed.
template <class Vectors, int Rows, class T, class C>
void few_rows_block(C& c, Index row, const T* x, Index xs, const T* w, Index ws, Index first, Index width, Index k) {
  // Rows of w a block takes: eight partial sums or more to hide the latency of the adds, no more
  // than the registers hold beside the loads. One or two rows of x take four rows of w with 16
  // registers and eight with 32: with AVX-512, eight streamed 10-15% faster than four at one and
  // two rows. More rows of x take two and four (four stream faster than two, three or eight with
  // 32 registers). A row's sums are the same whichever block it is in.
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
/// given form of the kernel. The rows go few_rows_group at a time over 128 KiB slices of w, so
/// that w comes from memory once and from cache for the next group.
template <class Vectors, class T, class C>
void few_rows_times_wt(Vectors, C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n, Index k) {
  constexpr int group = few_rows_group<Vectors>;
  const Index slice = std::max<Index>(16, Index{128 << 10} / (k * Index{sizeof(T)}));
  // few_rows_block<rows> for the `rows` = 1 … group rows from row i.
  const auto block = [&]<int... R>(std::integer_sequence<int, R...>, Index i, Index j, Index width) {
    const Index rows = std::min<Index>(group, m - i);
    (void)((rows == R + 1 && (few_rows_block<Vectors, R + 1>(c, i, x + i * xs, xs, w, ws, j, width, k), true)) || ...);
  };
  for (Index j = 0; j < n; j += slice)
    for (Index i = 0; i < m; i += group) block(std::make_integer_sequence<int, group>{}, i, j, std::min(slice, n - j));
}

/// c += x · wᵀ, with the widest form of the kernel this CPU runs.
template <class T, class C>
void few_rows_times_wt(C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n, Index k) {
  with_decode_vectors([&](auto vectors) { few_rows_times_wt(vectors, c, x, xs, m, w, ws, n, k); });
}

}  // namespace moekit::detail
