#pragma once
// The kernels behind moekit::gemm_add, gemm and gemm_each (core/gemm.hpp). Each product goes to one of
// seven kernels, chosen by the table of cases in choose_kernel: the vector kernels of
// vector_kernels.hpp, or Eigen's own, packing into buffers each thread keeps between calls (Eigen's
// product operator packs into fresh ones at every call; a steady state that allocates nothing is
// one of the layer's promises, docs/performance.md#allocations).
//
// Eigen's GEMM is called through its internal entry point (general_matrix_matrix_product) with
// its blocking heuristic, so up to a depth of max_packed_depth every bit of the result is that of
// `c.noalias() += a · b`; deeper products are cut into shorter blocks and agree to rounding.
#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include <moekit/core/detail/threads.hpp>
#include <moekit/core/detail/vector_kernels.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit::detail {

/// Longest run of the inner dimension packed at once. Eigen's heuristic packs about 1000, sized for
/// a GEMM that has the caches to itself; every thread here keeps its own blocks, and 256 keeps each
/// thread's under 512 KiB for the layer's 256-square tiles at no cost in speed
/// (docs/performance.md#peak-memory).
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
  /// The B buffer as scratch of at least `size` elements: the vector kernels' slabs, turned blocks
  /// and copies of panels.
  T* scratch(std::size_t size) {
    grow(0, size);
    return b_.data();
  }
  /// At least a and b elements. What the buffers held is dead between products, so the old
  /// buffer is freed before the new one is taken: never both at once at the heap's peak.
  void grow(std::size_t a, std::size_t b) {
    const auto at_least = [](Values& v, std::size_t size) {
      if (v.size() >= size) return;
      v = Values();
      v.resize(size);
    };
    at_least(a_, a);
    at_least(b_, b);
  }
  std::size_t a_size() const { return a_.size(); }
  std::size_t b_size() const { return b_.size(); }

 private:
  using Values = AlignedValues<T>;
  Values a_, b_;
};

/// GemmBlocks for each thread of the arena. A thread grows its own blocks when a product needs
/// more; ready(), called outside parallel loops (before them, and after them so that the first
/// step leaves every thread ready for the next), grows every thread's to the largest any has
/// needed. So after the first step, whichever thread takes whichever tile, nothing is allocated.
template <class T>
class GemmWorkspace {
 public:
  void ready() {
    const auto threads = static_cast<std::size_t>(std::max(1, max_threads()));
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
    const int i = thread_index();
    return slots_[i >= 0 && static_cast<std::size_t>(i) < slots_.size() ? static_cast<std::size_t>(i) : 0];
  }

 private:
  std::vector<GemmBlocks<T>> slots_;
};

template <class M>
constexpr int storage_order = std::remove_cvref_t<M>::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;

/// An operand as the products take it: a dense block with unit inner stride, by its data, size and
/// outer stride, in storage order Order. Every block, map, reference or transpose the callers hold
/// becomes one of these, so each product is compiled once per scalar and storage order, not once
/// per expression type (compiled_kernels.cpp compiles them all once, for float and double).
template <class T, int Order>
using StridedMatrix =
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Order>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T, int Order>
using ConstStridedMatrix =
    Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Order>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// m as a StridedMatrix, or a ConstStridedMatrix where its scalars are const (as through a const&).
template <class M>
auto strided(M&& m) {
  using Plain = std::remove_cvref_t<M>;
  using T = typename Plain::Scalar;
  eigen_assert(m.innerStride() == 1);
  if constexpr (std::is_const_v<std::remove_pointer_t<decltype(m.data())>>)
    return ConstStridedMatrix<T, storage_order<Plain>>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride()));
  else
    return StridedMatrix<T, storage_order<Plain>>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride()));
}

/// From this many rows, x · Wᵀ in vectors wider than the build's runs by slabs (choose_kernel):
/// where transposing the weights starts to pay (docs/kernels.md#wider-vectors).
inline constexpr Index slab_rows = 64;

/// c += x · wᵀ for row-major c: slabs of broadcast_depth columns of w, transposed in vectors into
/// the thread's packing buffer (broadcast_depth · n elements), each then added by times_b, both
/// in the widest form the CPU runs. The sums are those of times_b over the whole of wᵀ.
template <class T, class C>
void times_wt_by_slabs(GemmBlocks<T>& blocks, C& c, const T* x, Index xs, Index m, const T* w, Index ws, Index n,
                       Index k) {
  T* slab = blocks.scratch(static_cast<std::size_t>(broadcast_depth * n));
  with_widest_vectors([&](auto vectors) {
    for (Index p = 0; p < k; p += broadcast_depth) {
      const Index depth = std::min(broadcast_depth, k - p);
      decltype(vectors)::transpose(w + p, ws, n, depth, slab, n);
      times_b(vectors, c.data(), c.outerStride(), x + p, xs, 1, m, slab, n, n, depth);
    }
  });
}

/// Past this many rows x · Wᵀ runs turned where the CPU runs AVX-512, and up to it by times_wt's
/// dot products (choose_kernel): where turned becomes the faster (docs/kernels.md#turned-past).
inline constexpr Index turned_past = 24;

/// The most rows of x a turned product (times_wt_turned) takes at once; more are cut into blocks:
/// past it, a block's transposed x no longer stays in cache (docs/kernels.md#turned-blocks).
inline constexpr Index turned_rows = 192;

/// Of a turned product's block of `rows` rows, how many past its last whole vector go by
/// times_wt's dot products: those left past more than one vector, where they fit one group.
template <class Vectors, class T>
constexpr Index dotted_rows(Index rows) {
  constexpr Index lanes = Vectors::bytes / Index{sizeof(T)};
  return rows > lanes && rows % lanes <= times_wt_group<Vectors> ? rows % lanes : 0;
}

/// c[i] += x · w[i]ᵀ for row-major c[i], turned: c[i]ᵀ = w[i] · xᵀ by times_b, each row of w[i]
/// broadcast as it lies, so no weight is packed or transposed (Eigen packs each tile's weights for
/// its few rows; the slabs transpose them). x is transposed instead, a block of broadcast_depth
/// at a time, into the thread's buffer, once for all the weights (a layer's gate and up
/// projections, docs/kernels.md#shared-x), its rows padded to whole vectors so that every
/// row of x is summed in vector lanes alike, whatever rows are beside it; each c[i]ᵀ is then
/// transposed back and added. More than turned_rows rows go in the fewest blocks of at most
/// turned_rows, whole vectors but the last, one after another. The sums are those of times_b
/// over the whole of xᵀ, whatever the blocks; but the rows past the last whole vector, where they
/// fit one group of times_wt, go by its dot products instead, over each block of w[i] right after
/// times_b has read it (still in cache): turned, a vector of 16 lanes for one to six rows did up
/// to sixteen times their arithmetic (docs/kernels.md#dot-tail). Their bits are those of times_wt
/// over each block of broadcast_depth in turn, whatever rows are beside them.
template <class Vectors, class T, class C, std::size_t N>
void times_wt_turned(Vectors vectors, GemmBlocks<T>& blocks, const std::array<C*, N>& c, const T* x, Index xs,
                     Index m, const std::array<const T*, N>& w, Index ws, Index n, Index k) {
  constexpr Index lanes = Vectors::bytes / Index{sizeof(T)};
  const auto whole_vectors = [](Index rows) { return (rows + lanes - 1) / lanes * lanes; };
  const Index row_blocks = (m + turned_rows - 1) / turned_rows;
  const Index block = std::min(whole_vectors((m + row_blocks - 1) / row_blocks), m);
  // The slab holds a block of xᵀ (at most broadcast_depth of k deep), then a cᵀ transposed back.
  const Index held = std::max(std::min(broadcast_depth, k), n);
  T* slab = blocks.scratch(static_cast<std::size_t>((held + Index{N} * n) * whole_vectors(block)));
  for (Index first = 0; first < m; first += block) {
    const Index all = std::min(block, m - first);
    const Index dotted = dotted_rows<Vectors, T>(all);  // by times_wt
    const Index rows = all - dotted, width = whole_vectors(rows), each = n * width;  // turned
    const T* x_rows = x + first * xs;
    T* turned = slab + held * width;
    std::fill_n(turned, Index{N} * each, T(0));
    for (Index i = 0; i < std::min(broadcast_depth, k); ++i)
      std::fill(slab + i * width + rows, slab + (i + 1) * width, T(0));
    for (Index p = 0; p < k; p += broadcast_depth) {
      const Index depth = std::min(broadcast_depth, k - p);
      Vectors::transpose(x_rows + p, xs, rows, depth, slab, width);
      for (std::size_t i = 0; i < N; ++i) {
        times_b(vectors, turned + Index(i) * each, width, w[i] + p, ws, 1, n, slab, width, width, depth);
        if (dotted > 0) {
          auto left = c[i]->middleRows(first + rows, dotted);
          times_wt(vectors, left, x_rows + rows * xs + p, xs, dotted, w[i] + p, ws, n, depth);
        }
      }
    }
    for (std::size_t i = 0; i < N; ++i) {
      Vectors::transpose(turned + Index(i) * each, width, n, rows, slab, n);
      c[i]->middleRows(first, rows).noalias() += Eigen::Map<const Matrix<T>>(slab, rows, n);
    }
  }
}

/// The ways gemm_add computes c += a · b.
enum class ProductKernel {
  coefficients,  // each coefficient's dot product, as Eigen's operator computes tiny products
  turned,        // x · Wᵀ as W · xᵀ by broadcasts, x transposed once (times_wt_turned)
  slabs,         // x · Wᵀ as x · (Wᵀ transposed in slabs) by broadcasts (times_wt_by_slabs)
  row_dots,      // x · Wᵀ by dot products of rows of x and W (times_wt)
  gemv,          // Eigen's matrix-vector product: one row or one column
  broadcasts,    // a · B by broadcasts into rows of B (times_b)
  eigen,         // Eigen's blocked GEMM, packing into the thread's kept buffers (eigen_gemm_add)
};

/// Which kernel computes an (m × k) · (k × n) product, given its storage orders and this CPU's
/// vectors: their width in bytes, and whether they are wider than the build's (and so than
/// Eigen's GEMM, which keeps to the build's). The first case that holds, top to bottom:
///
///   kernel        operands (a · b into c)       when
///   coefficients  any                           m + n + k < Eigen's coefficient-based threshold
///   turned        row-major x · Wᵀ into rows    more than turned_past rows, 64-byte vectors
///   slabs         row-major x · Wᵀ into rows    slab_rows rows or more, wider vectors
///   row_dots      row-major x · Wᵀ              few_rows rows or fewer (decode), or wider vectors
///   gemv          any                           one row or one column
///   broadcasts    a · row-major B into rows     wider or 64-byte vectors
///   eigen         any                           otherwise
///
/// The limits (turned_past, slab_rows, few_rows) are where the measured kernels cross
/// (docs/kernels.md).
template <int COrder, int AOrder, int BOrder>
constexpr ProductKernel choose_kernel(Index m, Index n, Index k, int vector_bytes, bool wider) {
  constexpr bool x_times_wt = AOrder == Eigen::RowMajor && BOrder == Eigen::ColMajor;
  constexpr bool into_rows = COrder == Eigen::RowMajor;
  if (m + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) return ProductKernel::coefficients;
  if (x_times_wt && into_rows && m > turned_past && vector_bytes == 64) return ProductKernel::turned;
  if (x_times_wt && into_rows && m >= slab_rows && wider) return ProductKernel::slabs;
  if (x_times_wt && (m <= few_rows || wider)) return ProductKernel::row_dots;
  if (m == 1 || n == 1) return ProductKernel::gemv;
  if (into_rows && BOrder == Eigen::RowMajor && (wider || vector_bytes == 64)) return ProductKernel::broadcasts;
  return ProductKernel::eigen;
}

/// choose_kernel on this CPU.
template <int COrder, int AOrder, int BOrder>
ProductKernel kernel_for(Index m, Index n, Index k) {
  return choose_kernel<COrder, AOrder, BOrder>(m, n, k, widest_vector_bytes(), runs_wider_than_build());
}

/// c += a · b, none of them empty, by Eigen's blocked GEMM kernel, packing into the calling
/// thread's blocks: gemm_add's product wherever the vector kernels take none (and the yardstick
/// of benchmarks/tile_kernel_benchmark).
template <class T, class C, class A, class B>
void eigen_gemm_add(GemmWorkspace<T>& workspace, C&& c, const A& a, const B& b) {
  using Out = std::remove_cvref_t<C>;
  const Index m = c.rows(), n = c.cols(), k = a.cols();
  auto& blocks = workspace.local();
  // A row-major result is the transposed product computed column-major (as Eigen does).
  blocks.use(Out::IsRowMajor ? GemmBlocks<T>::sizes(n, m, k) : GemmBlocks<T>::sizes(m, n, k));
  Eigen::internal::general_matrix_matrix_product<Index, T, storage_order<A>, false, T, storage_order<B>, false,
                                                 storage_order<Out>, 1>::run(m, n, k, a.data(), a.outerStride(),
                                                                             b.data(), b.outerStride(), c.data(),
                                                                             1, c.outerStride(), T(1), blocks);
}

/// The products of one scalar and one storage order of c, a and b, all on the calling thread, packing
/// into its blocks in `workspace`. What gemm_add, gemm and gemm_each run, once each operand is a
/// StridedMatrix: one class per scalar and storage orders, which compiled_kernels.cpp can compile
/// once for a whole program.
template <class T, int COrder, int AOrder, int BOrder>
struct Gemm {
  using C = StridedMatrix<T, COrder>;
  using A = ConstStridedMatrix<T, AOrder>;
  using B = ConstStridedMatrix<T, BOrder>;

  /// c += a · b.
  static void add(GemmWorkspace<T>& workspace, C c, const A& a, const B& b);

  /// c[i] = a · b[i] for each i: products of one a with operands of one shape (a layer's gate and
  /// up projections). Where they run turned, a is transposed once for all of them
  /// (docs/kernels.md#shared-x); each c[i] gets the bits gemm gives it.
  template <std::size_t N>
  static void set_each(GemmWorkspace<T>& workspace, const std::array<C*, N>& c, const A& a,
                       const std::array<const B*, N>& b);
};

// Defined outside the class, so not inline: MOEKIT_COMPILED_KERNELS's extern declarations below
// then keep a translation unit from compiling them (GCC compiles inline ones all the same).

template <class T, int COrder, int AOrder, int BOrder>
void Gemm<T, COrder, AOrder, BOrder>::add(GemmWorkspace<T>& workspace, C c, const A& a, const B& b) {
  eigen_assert(a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows());
  const Index m = c.rows(), n = c.cols(), k = a.cols();
  if (m == 0 || n == 0 || k == 0) return;
  switch (kernel_for<COrder, AOrder, BOrder>(m, n, k)) {
    case ProductKernel::coefficients:
      Eigen::internal::call_restricted_packet_assignment_no_alias(c, a.lazyProduct(b),
                                                                 Eigen::internal::add_assign_op<T, T>());
      return;
    case ProductKernel::turned:
      if constexpr (COrder == Eigen::RowMajor)
        with_widest_vectors([&](auto vectors) {
          times_wt_turned(vectors, workspace.local(), std::array{&c}, a.data(), a.outerStride(), m,
                          std::array{b.data()}, b.outerStride(), n, k);
        });
      return;
    case ProductKernel::slabs:
      if constexpr (COrder == Eigen::RowMajor)
        times_wt_by_slabs(workspace.local(), c, a.data(), a.outerStride(), m, b.data(), b.outerStride(), n, k);
      return;
    case ProductKernel::row_dots:
      times_wt<T>(c, a.data(), a.outerStride(), m, b.data(), b.outerStride(), n, k);
      return;
    case ProductKernel::gemv:
      c.noalias() += a * b;
      return;
    case ProductKernel::broadcasts: {
      constexpr bool a_rows = AOrder == Eigen::RowMajor;
      times_b<T>(c.data(), c.outerStride(), a.data(), a_rows ? a.outerStride() : 1, a_rows ? 1 : a.outerStride(), m,
                 b.data(), b.outerStride(), n, k, workspace.local().scratch(panel_copy_size<T>));
      return;
    }
    case ProductKernel::eigen:
      eigen_gemm_add(workspace, c, a, b);
      return;
  }
}

template <class T, int COrder, int AOrder, int BOrder>
template <std::size_t N>
void Gemm<T, COrder, AOrder, BOrder>::set_each(GemmWorkspace<T>& workspace, const std::array<C*, N>& c, const A& a,
                                               const std::array<const B*, N>& b) {
  const Index m = a.rows(), k = a.cols(), n = b[0]->cols();
  bool shared = k > 0 && n > 0 && kernel_for<COrder, AOrder, BOrder>(m, n, k) == ProductKernel::turned;
  for (std::size_t i = 0; i < N; ++i)
    shared = shared && b[i]->cols() == n && b[i]->outerStride() == b[0]->outerStride();
  if (!shared) {
    for (std::size_t i = 0; i < N; ++i) {
      c[i]->setZero();
      add(workspace, *c[i], a, *b[i]);
    }
    return;
  }
  std::array<const T*, N> w;
  for (std::size_t i = 0; i < N; ++i) {
    eigen_assert(c[i]->rows() == m && c[i]->cols() == n && b[i]->rows() == k);
    c[i]->setZero();
    w[i] = b[i]->data();
  }
  with_widest_vectors([&](auto vectors) {
    times_wt_turned(vectors, workspace.local(), c, a.data(), a.outerStride(), m, w, b[0]->outerStride(), n, k);
  });
}

/// The Gemm of c, a and b's scalar and storage orders.
template <class C, class A, class B>
using GemmOf = Gemm<typename std::remove_cvref_t<C>::Scalar, storage_order<C>, storage_order<A>, storage_order<B>>;

// With MOEKIT_COMPILED_KERNELS defined, every translation unit takes the products from
// moekit/compiled_kernels.cpp, compiled once, instead of compiling them itself (docs/getting_started.md#compile-time).
#define MOEKIT_GEMM_INSTANCES(EXTERN, T)                                                                              \
  EXTERN template struct Gemm<T, Eigen::RowMajor, Eigen::RowMajor, Eigen::RowMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::RowMajor, Eigen::RowMajor, Eigen::ColMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::RowMajor, Eigen::ColMajor, Eigen::RowMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::RowMajor, Eigen::ColMajor, Eigen::ColMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::ColMajor, Eigen::RowMajor, Eigen::RowMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::ColMajor, Eigen::RowMajor, Eigen::ColMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::ColMajor, Eigen::ColMajor, Eigen::RowMajor>;                               \
  EXTERN template struct Gemm<T, Eigen::ColMajor, Eigen::ColMajor, Eigen::ColMajor>;                               \
  EXTERN template void Gemm<T, Eigen::RowMajor, Eigen::RowMajor, Eigen::ColMajor>::set_each<2>(                    \
      GemmWorkspace<T>&, const std::array<StridedMatrix<T, Eigen::RowMajor>*, 2>&,                                   \
      const ConstStridedMatrix<T, Eigen::RowMajor>&, const std::array<const ConstStridedMatrix<T, Eigen::ColMajor>*, 2>&);
#ifdef MOEKIT_COMPILED_KERNELS
MOEKIT_GEMM_INSTANCES(extern, float)
MOEKIT_GEMM_INSTANCES(extern, double)
#endif

}  // namespace moekit::detail
