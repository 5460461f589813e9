#pragma once
// C += α·A·B with Eigen's own blocked GEMM kernel, packing into buffers the caller owns and
// keeps between calls. Eigen's product operator packs into fresh buffers (on the heap past
// 128 KiB) at every call; the layer runs GEMMs on tiles many times a step, and a steady state
// that allocates nothing is one of its promises (docs/performance.md#allocations).
//
// This uses Eigen 3.4's internal GEMM entry point (general_matrix_matrix_product) and blocking
// heuristic, so up to a depth of max_packed_depth the arithmetic — every bit of the result — is
// that of `C.noalias() += A·B`; deeper products are cut into shorter blocks than Eigen's, so
// their sums are grouped differently and agree to rounding. Tiny products go coefficient by
// coefficient; x · Wᵀ with up to few_rows rows (decode, one row included) has a kernel of its
// own, few_rows_times_wt; other products with one row or one column go to Eigen's GEMV, as the
// operator sends them.
#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include <tbb/task_arena.h>

#include <moekit/core/tensor.hpp>

namespace moekit::detail {

/// Longest run of the inner dimension packed at once. Eigen's single-threaded heuristic packs up
/// to about 1000 (a 256-column tile of weights: ~1 MiB), sized for a GEMM that has the caches to
/// itself; here every thread keeps its own blocks, and at 16 threads they added more than half
/// the saved activations of a small batch. A 256-long block keeps every thread's blocks under
/// 512 KiB for the layer's 256-square tiles at no measured cost in speed (SSE2 and AVX-512,
/// docs/performance.md#peak-memory).
inline constexpr Index max_packed_depth = 256;

/// Packing buffers for one thread's GEMMs, and the blocking sizes for the current product.
template <class T>
class GemmBlocks : public Eigen::internal::level3_blocking<T, T> {
 public:
  /// Elements of the packed A and B blocks for an (m × k)·(k × n) product into a column-major
  /// result.
  struct Sizes {
    Index kc, mc, nc;
    std::size_t a() const { return static_cast<std::size_t>(mc * kc); }
    std::size_t b() const { return static_cast<std::size_t>(kc * nc); }
  };
  /// Eigen's blocking heuristic, with the depth cut into equal blocks of at most max_packed_depth
  /// (a multiple of 8, as Eigen's kernel peels 8 at a time). Sizes only: the same product is cut
  /// the same way on any thread.
  static Sizes sizes(Index m, Index n, Index k) {
    Sizes s{k, m, n};
    Eigen::internal::computeProductBlockingSizes<T, T, 1, Index>(s.kc, s.mc, s.nc, Index{1});
    if (s.kc > max_packed_depth) {
      const Index blocks = (k + max_packed_depth - 1) / max_packed_depth;
      s.kc = std::min(max_packed_depth, ((k + blocks - 1) / blocks + 7) / 8 * 8);
    }
    return s;
  }

  /// Points Eigen at the buffers, grown first if the product needs more.
  void use(const Sizes& s) {
    grow(s.a(), s.b());
    this->m_kc = s.kc;
    this->m_mc = s.mc;
    this->m_nc = s.nc;
    this->m_blockA = a_.data();
    this->m_blockB = b_.data();
  }
  void grow(std::size_t a, std::size_t b) {
    if (a_.size() < a) a_.resize(a);
    if (b_.size() < b) b_.resize(b);
  }
  std::size_t a_size() const { return a_.size(); }
  std::size_t b_size() const { return b_.size(); }

 private:
  std::vector<T, Eigen::aligned_allocator<T>> a_, b_;
};

/// GemmBlocks for each thread of the arena. A thread grows its own blocks when a product needs
/// more; ready(), called outside parallel loops (before them, and after them so that the first
/// step leaves every thread ready for the next), grows every thread's to the largest any has
/// needed. So after the first step, whichever thread takes whichever tile, nothing is allocated.
template <class T>
class GemmWorkspace {
 public:
  void ready() {
    const auto threads = static_cast<std::size_t>(std::max(1, tbb::this_task_arena::max_concurrency()));
    if (slots_.size() < threads) slots_.resize(threads);
    std::size_t a = 0, b = 0;
    for (const auto& slot : slots_) {
      a = std::max(a, slot.a_size());
      b = std::max(b, slot.b_size());
    }
    for (auto& slot : slots_) slot.grow(a, b);
  }
  /// Bytes of packing buffers kept, over all threads.
  std::size_t bytes() const {
    std::size_t sum = 0;
    for (const auto& slot : slots_) sum += (slot.a_size() + slot.b_size()) * sizeof(T);
    return sum;
  }
  std::size_t threads() const { return slots_.size(); }
  /// The calling thread's blocks (call ready() first in the arena the thread works in).
  GemmBlocks<T>& local() {
    if (slots_.empty()) ready();
    const int i = tbb::this_task_arena::current_thread_index();
    return slots_[i >= 0 && static_cast<std::size_t>(i) < slots_.size() ? static_cast<std::size_t>(i) : 0];
  }

 private:
  std::vector<GemmBlocks<T>> slots_;
};

template <class M>
constexpr int storage_order = M::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;

/// Up to this many rows, a product of row-major rows with a transposed row-major matrix (the
/// experts' x · Wᵀ at decode) goes to few_rows_times_wt: packing the weights for a GEMM kernel
/// would read them once more than the product itself does, and at these sizes reading the
/// weights is most of the cost. benchmarks/decode_kernel_benchmark finds the kernel as fast as
/// Eigen's GEMM or faster up to 32 rows, with SSE2 and AVX-512, and the layer at T = 64 (the
/// busiest expert 19–25 rows) 6–15% faster with 32 here than with 16; past 32 rows neither
/// measurement found a steady gain (docs/performance.md#decode-kernel).
inline constexpr Index few_rows = 32;

/// How far ahead of its loads the decode kernel prefetches each row of w, in bytes. The hardware
/// prefetcher stops at each 4 KiB page, and a row of 1024 floats is one, so each row's prefetch
/// runs on into the row that takes its place in the next block. 2 KiB ahead streamed 20–30%
/// faster than a whole row ahead (the next block's row at the same place), and 512 B was too
/// close (docs/performance.md#decode-kernel).
inline constexpr Index prefetch_ahead_bytes = 2048;

/// out[r][c] = Σ_k x[r·xs + k] · w[c·ws + k] for Rows rows of x and Cols rows of w: each packet
/// of w is loaded once for all the rows, from registers. The sum over k runs in packet lanes and
/// then across them, the same order whatever the other rows are. Never inlined: inlined where
/// the depth is a constant, GCC 12 kept the partial sums in memory, not registers (2.3× slower).
template <int Rows, int Cols, class T>
EIGEN_DONT_INLINE void dot_block(const T* x, Index xs, const T* w, Index ws, Index k, T (&out)[Rows][Cols]) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  constexpr Index lanes = ei::packet_traits<T>::size, ahead = prefetch_ahead_bytes / Index{sizeof(T)};
  Packet acc[Rows][Cols];
  for (auto& row : acc)
    for (auto& a : row) a = ei::pset1<Packet>(T(0));
  // One step of lanes along k; row c of w prefetches at ahead_of_row0 + c·ws.
  const auto step = [&](Index i, const T* ahead_of_row0) {
    Packet wp[Cols];
    for (int c = 0; c < Cols; ++c) {
      wp[c] = ei::ploadu<Packet>(w + c * ws + i);
      ei::prefetch(ahead_of_row0 + c * ws);
    }
    for (int r = 0; r < Rows; ++r) {
      const Packet xp = ei::ploadu<Packet>(x + r * xs + i);
      for (int c = 0; c < Cols; ++c) acc[r][c] = ei::pmadd(xp, wp[c], acc[r][c]);
    }
  };
  Index i = 0;
  for (; i + lanes <= k && i + ahead < k; i += lanes) step(i, w + i + ahead);
  for (; i + lanes <= k; i += lanes) step(i, w + Cols * ws + (i + ahead - k));  // into the next block's rows
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) {
      T sum = ei::predux(acc[r][c]);
      for (Index j = i; j < k; ++j) sum += x[r * xs + j] * w[c * ws + j];
      out[r][c] = sum;
    }
}

/// Rows of x the decode kernel takes at once, each weight it loads serving all of them. With
/// AVX-512's 32 vector registers, six rows by four rows of w keep 24 partial sums beside the loads
/// (seven or eight rows, in blocks of three or two rows of w, streamed slower than 4 + 3 and
/// 4 + 4); with 16 registers, four (docs/performance.md#decode-kernel).
inline constexpr int few_rows_group = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 6 : 4;

/// c[·, first … first+width) += Rows rows of x times those rows of w, transposed.
template <int Rows, class T, class C>
void few_rows_block(C& c, Index row, const T* x, Index xs, const T* w, Index ws, Index first, Index width, Index k) {
  // Rows of w a block takes: eight partial sums or more to hide the latency of the adds, no more
  // than the registers hold beside the loads. One row takes four: it waits on memory, not on
  // adds. Four rows of w stream faster than two, three or eight.
  constexpr int cols = Rows <= 2 || EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;
  Index j = first;
  for (; j + cols <= first + width; j += cols) {
    T out[Rows][cols];
    dot_block<Rows, cols>(x, xs, w + j * ws, ws, k, out);
    for (int r = 0; r < Rows; ++r)
      for (int q = 0; q < cols; ++q) c(row + r, j + q) += out[r][q];
  }
  for (; j < first + width; ++j) {
    T out[Rows][1];
    dot_block<Rows, 1>(x, xs, w + j * ws, ws, k, out);
    for (int r = 0; r < Rows; ++r) c(row + r, j) += out[r][0];
  }
}

/// c += x · wᵀ for m ≤ few_rows rows x [m,k] and w [n,k], both with rows contiguous. The rows go
/// few_rows_group at a time over 128 KiB slices of w, so that w comes from memory once and from
/// cache for the next group.
template <class T, class C>
void few_rows_times_wt(C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n, Index k) {
  const Index slice = std::max<Index>(16, Index{128 << 10} / (k * Index{sizeof(T)}));
  // few_rows_block<rows> for the `rows` = 1 … few_rows_group rows from row i.
  const auto group = [&]<int... R>(std::integer_sequence<int, R...>, Index i, Index j, Index width) {
    const Index rows = std::min<Index>(few_rows_group, m - i);
    ((rows == R + 1 && (few_rows_block<R + 1>(c, i, x + i * xs, xs, w, ws, j, width, k), true)) || ...);
  };
  for (Index j = 0; j < n; j += slice)
    for (Index i = 0; i < m; i += few_rows_group)
      group(std::make_integer_sequence<int, few_rows_group>{}, i, j, std::min(slice, n - j));
}

/// c += a · b, on the calling thread, packing into its blocks in `workspace`. Each operand is a
/// dense block with unit inner stride (a matrix, a block of one, or their transposes).
template <class T, class C, class A, class B>
void gemm_add(GemmWorkspace<T>& workspace, C&& c, const A& a, const B& b) {
  using Out = std::remove_cvref_t<C>;
  eigen_assert(a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows());
  eigen_assert(a.innerStride() == 1 && b.innerStride() == 1 && c.innerStride() == 1);
  const Index m = c.rows(), n = c.cols(), k = a.cols();
  if (m == 0 || n == 0 || k == 0) return;
  if (m + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {  // tiny: coefficient by coefficient, as the operator
    Eigen::internal::call_restricted_packet_assignment_no_alias(c, a.lazyProduct(b),
                                                               Eigen::internal::add_assign_op<T, T>());
    return;
  }
  if constexpr (std::remove_cvref_t<A>::IsRowMajor && !std::remove_cvref_t<B>::IsRowMajor) {
    if (m <= few_rows) {  // x · Wᵀ for a few rows x (decode), one row included
      few_rows_times_wt<T>(c, a.data(), a.outerStride(), m, b.data(), b.outerStride(), n, k);
      return;
    }
  }
  if (m == 1 || n == 1) {  // a GEMV: no packing, each weight read once
    c.noalias() += a * b;
    return;
  }
  auto& blocks = workspace.local();
  // A row-major result is the transposed product computed column-major (as Eigen does).
  blocks.use(Out::IsRowMajor ? GemmBlocks<T>::sizes(n, m, k) : GemmBlocks<T>::sizes(m, n, k));
  Eigen::internal::general_matrix_matrix_product<Index, T, storage_order<A>, false, T, storage_order<B>, false,
                                                 storage_order<Out>, 1>::run(m, n, k, a.data(), a.outerStride(),
                                                                             b.data(), b.outerStride(), c.data(),
                                                                             1, c.outerStride(), T(1), blocks);
}

/// c = a · b.
template <class T, class C, class A, class B>
void gemm(GemmWorkspace<T>& workspace, C&& c, const A& a, const B& b) {
  c.setZero();
  gemm_add(workspace, c, a, b);
}

}  // namespace moekit::detail
