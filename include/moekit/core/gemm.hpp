#pragma once
// The products an expert's author calls, as the project's experts and the router do: c = a·b,
// c += a·b, and c[i] = a·b[i] sharing one pass over a. Each runs on the calling thread (run them
// inside a parallel loop over tiles, as GroupedGemm does), packs into the calling thread's
// buffers in the layer's Workspace, and takes the kernel that detail::choose_kernel's table of
// cases gives for its shape and storage orders (docs/kernels.md#choice). Results do not depend
// on the number of threads.
#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include <moekit/core/concepts.hpp>
#include <moekit/core/detail/bf16.hpp>
#include <moekit/core/detail/gemm.hpp>

namespace moekit {

/// c += a · b, on the calling thread, packing into its blocks in `workspace`. Each operand is a
/// dense block with unit inner stride (a matrix, a block of one, or their transposes).
template <class T, class C, class A, class B>
void gemm_add(Workspace<T>& workspace, C&& c, const A& a, const B& b) {
  detail::GemmOf<C, A, B>::add(workspace, detail::strided(c), detail::strided(a), detail::strided(b));
}

/// c = a · b.
template <class T, class C, class A, class B>
void gemm(Workspace<T>& workspace, C&& c, const A& a, const B& b) {
  c.setZero();
  gemm_add(workspace, c, a, b);
}

/// c[i] = a · b[i] for each i (Gemm::set_each).
template <class T, class C, class A, class B, std::size_t N>
void gemm_each(Workspace<T>& workspace, const std::array<C*, N>& c, const A& a, const std::array<const B*, N>& b) {
  using Kernel = detail::GemmOf<C, A, B>;
  std::array<typename Kernel::C, N> c_strided = [&]<std::size_t... I>(std::index_sequence<I...>) {
    return std::array<typename Kernel::C, N>{detail::strided(*c[I])...};
  }(std::make_index_sequence<N>{});
  std::array<typename Kernel::B, N> b_strided = [&]<std::size_t... I>(std::index_sequence<I...>) {
    return std::array<typename Kernel::B, N>{detail::strided(*b[I])...};
  }(std::make_index_sequence<N>{});
  std::array<typename Kernel::C*, N> c_pointers;
  std::array<const typename Kernel::B*, N> b_pointers;
  for (std::size_t i = 0; i < N; ++i) {
    c_pointers[i] = &c_strided[i];
    b_pointers[i] = &b_strided[i];
  }
  Kernel::set_each(workspace, c_pointers, detail::strided(a), b_pointers);
}

/// c += bf16(a) · bf16(b): each operand rounded to the nearest bf16, the sums in float, by
/// vdpbf16ps where the CPU has it and in float vectors, with the same bits, where it has not
/// (docs/kernels.md#bf16). c is row-major with unit inner stride; a and b any dense blocks.
template <class C, class A, class B>
void bf16_gemm_add(C&& c, const A& a, const B& b) {
  static_assert(std::is_same_v<typename std::remove_cvref_t<C>::Scalar, float>,
                "moekit::bf16_gemm_add: bf16 products sum in float; expected float matrices");
  eigen_assert(c.colStride() == 1 && a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows());
  detail::bf16_gemm_add(c.data(), c.rowStride(), c.rows(), c.cols(), a.data(), a.rowStride(), a.colStride(), b.data(),
                        b.rowStride(), b.colStride(), a.cols());
}

/// c[i] = bf16(a) · bf16(b[i]) for each i, a packed once for all (set_each's bf16 twin): the
/// operands of each c[i] must lie alike.
template <class C, class A, class B, std::size_t N>
void bf16_gemm_each(const std::array<C*, N>& c, const A& a, const std::array<const B*, N>& b) {
  static_assert(std::is_same_v<typename std::remove_cvref_t<C>::Scalar, float>,
                "moekit::bf16_gemm_each: bf16 products sum in float; expected float matrices");
  std::array<float*, N> c_data;
  std::array<const float*, N> b_data;
  for (std::size_t i = 0; i < N; ++i) {
    eigen_assert(c[i]->colStride() == 1 && c[i]->rowStride() == c[0]->rowStride() && c[i]->rows() == a.rows() &&
                 c[i]->cols() == c[0]->cols() && b[i]->rows() == a.cols() && b[i]->cols() == c[0]->cols() &&
                 b[i]->rowStride() == b[0]->rowStride() && b[i]->colStride() == b[0]->colStride());
    c[i]->setZero();
    c_data[i] = c[i]->data();
    b_data[i] = b[i]->data();
  }
  detail::bf16_gemm_add(c_data.data(), c[0]->rowStride(), a.rows(), c[0]->cols(), a.data(), a.rowStride(),
                        a.colStride(), b_data.data(), b[0]->rowStride(), b[0]->colStride(), a.cols(), N);
}

/// c += a · b in the given precision: gemm_add, or bf16_gemm_add.
template <Precision P, class T, class C, class A, class B>
void gemm_add(Workspace<T>& workspace, C&& c, const A& a, const B& b) {
  if constexpr (P == Precision::bf16)
    bf16_gemm_add(c, a, b);
  else
    gemm_add(workspace, c, a, b);
}

/// c = a · b in the given precision.
template <Precision P, class T, class C, class A, class B>
void gemm(Workspace<T>& workspace, C&& c, const A& a, const B& b) {
  c.setZero();
  gemm_add<P>(workspace, c, a, b);
}

}  // namespace moekit
