#pragma once
// The products an expert's author calls, as the project's experts and the router do: c = a·b,
// c += a·b, and c[i] = a·b[i] sharing one pass over a. Each runs on the calling thread (run them
// inside a parallel loop over tiles, as GroupedGemm does), packs into the calling thread's
// buffers in the layer's Workspace, and takes the kernel that detail::choose_kernel's table of
// cases gives for its shape and storage orders (docs/kernels.md#choice). Results do not depend
// on the number of threads.
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>
#include <type_traits>
#include <utility>

#include <moekit/core/concepts.hpp>
#include <moekit/core/detail/bf16.hpp>
#include <moekit/core/detail/gemm.hpp>
#include <moekit/core/detail/int8.hpp>

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

/// A weight W [outputs, depth], each row an output channel, quantised once for int8 products:
/// each channel's values rounded to the nearest of 255 levels in ±max|W_c| (int8 in [-127, 127],
/// scale max|W_c| / 127), stored in the kernel's panels of 16 channels
/// (docs/kernels.md#int8).
class Int8Weights {
 public:
  Int8Weights() = default;

  template <class Derived>
  explicit Int8Weights(const Eigen::MatrixBase<Derived>& w)
      : outputs_(w.rows()), depth_(w.cols()), quads_(detail::int8_quads(w.cols())) {
    require(depth_ <= detail::int8_max_depth, "moekit::Int8Weights: depth ", depth_, "; expected at most ",
            detail::int8_max_depth, " (beyond it int8 sums could leave int32)");
    const Index padded = (outputs_ + detail::int8_panel - 1) / detail::int8_panel * detail::int8_panel;
    panels_.assign(static_cast<std::size_t>(padded * quads_), 0u);
    scales_.assign(static_cast<std::size_t>(padded), 0.0f);
    corrections_.assign(static_cast<std::size_t>(padded), 0);
    std::vector<float> channel(static_cast<std::size_t>(depth_));
    std::vector<std::uint32_t> quads(static_cast<std::size_t>(quads_));
    for (Index c = 0; c < outputs_; ++c) {
      for (Index j = 0; j < depth_; ++j) channel[static_cast<std::size_t>(j)] = static_cast<float>(w(c, j));
      scales_[static_cast<std::size_t>(c)] = detail::quantize_row(quads.data(), channel.data(), depth_);
      std::uint32_t* panel = panels_.data() + c / detail::int8_panel * quads_ * detail::int8_panel;
      std::int32_t sum = 0;
      for (Index q = 0; q < quads_; ++q) {  // the row's bytes hold q + 128: back to signed values
        const std::uint32_t word = quads[static_cast<std::size_t>(q)] ^ 0x80808080u;
        panel[q * detail::int8_panel + c % detail::int8_panel] = word;
        for (int b = 0; b < 4; ++b) sum += static_cast<std::int8_t>(word >> (8 * b));
      }
      corrections_[static_cast<std::size_t>(c)] = 128 * sum;
    }
  }

  Index outputs() const { return outputs_; }
  Index depth() const { return depth_; }
  /// Channel c's scale, and its value j as the int8 it is stored as.
  float scale(Index c) const { return scales_[static_cast<std::size_t>(c)]; }
  std::int8_t value(Index c, Index j) const {
    const std::uint32_t word = panels_[static_cast<std::size_t>(
        (c / detail::int8_panel * quads_ + j / 4) * detail::int8_panel + c % detail::int8_panel)];
    return static_cast<std::int8_t>(word >> (8 * (j % 4)));
  }
  /// The bytes a product reads: the values (with the padding of the last panel and of the depth
  /// to a multiple of 4), the scales and the corrections.
  std::size_t bytes() const {
    return panels_.size() * sizeof(std::uint32_t) + scales_.size() * sizeof(float) +
           corrections_.size() * sizeof(std::int32_t);
  }
  /// As the kernel reads them: quads per channel; panels; scales and corrections per channel.
  Index quads() const { return quads_; }
  const std::uint32_t* panels() const { return panels_.data(); }
  const float* scales() const { return scales_.data(); }
  const std::int32_t* corrections() const { return corrections_.data(); }

 private:
  Index outputs_ = 0, depth_ = 0, quads_ = 0;
  std::vector<std::uint32_t> panels_;      // panel p's quad q of channel 16p + l at (p·quads + q)·16 + l
  std::vector<float> scales_;              // [outputs padded to 16]
  std::vector<std::int32_t> corrections_;  // 128 · Σ_j value(c, j): the rows' shift, taken back
};

/// Rows quantised for int8 products: each row rounded to the nearest of 255 levels in ±max|row|,
/// stored shifted by 128 as unsigned bytes, with its scale. Quantise blocks of rows from several
/// threads once resize has made room for all.
class Int8Rows {
 public:
  void resize(Index rows, Index depth) {
    rows_ = rows;
    depth_ = depth;
    quads_ = detail::int8_quads(depth);
    words_.resize(static_cast<std::size_t>(rows * quads_));
    scales_.resize(static_cast<std::size_t>(rows));
  }
  /// Rows [first, first + x.rows()) from x [n, depth], on the calling thread.
  void quantize(Index first, ConstMatrixRef<float> x) {
    eigen_assert(x.cols() == depth_ && first >= 0 && first + x.rows() <= rows_);
    detail::with_int8_form([&](auto form) {
      form.quantize(words_.data() + first * quads_, scales_.data() + first, x.data(), x.outerStride(), x.rows(),
                    depth_);
    });
  }
  Index rows() const { return rows_; }
  Index depth() const { return depth_; }
  float scale(Index i) const { return scales_[static_cast<std::size_t>(i)]; }
  /// Row i's value j as the int8 it stands for.
  std::int8_t value(Index i, Index j) const {
    const std::uint32_t word = words_[static_cast<std::size_t>(i * quads_ + j / 4)];
    return static_cast<std::int8_t>(static_cast<int>((word >> (8 * (j % 4))) & 0xffu) - 128);
  }
  /// As the kernel reads them: quads per row, the rows' quads and their scales.
  Index quads() const { return quads_; }
  const std::uint32_t* words() const { return words_.data(); }
  const float* scales() const { return scales_.data(); }

 private:
  Index rows_ = 0, depth_ = 0, quads_ = 0;
  std::vector<std::uint32_t> words_;
  std::vector<float> scales_;
};

namespace detail {
/// int8_gemm by the given form.
template <class Form, class C>
void int8_gemm(Form form, C&& c, const Int8Rows& rows, Index first_row, const Int8Weights& w, Index first_output) {
  static_assert(std::is_same_v<typename std::remove_cvref_t<C>::Scalar, float>,
                "moekit::int8_gemm: int8 products give float outputs; expected a float matrix");
  eigen_assert(c.colStride() == 1 && rows.depth() == w.depth() && first_output % int8_panel == 0 &&
               first_row + c.rows() <= rows.rows() && first_output + c.cols() <= w.outputs());
  if (c.rows() == 0 || c.cols() == 0) return;
  int8_product(form, c.data(), c.rowStride(), c.rows(), c.cols(), rows.words() + first_row * rows.quads(),
               rows.quads(), rows.scales() + first_row, rows.quads(),
               w.panels() + first_output / int8_panel * w.quads() * int8_panel, w.scales() + first_output,
               w.corrections() + first_output);
}
}  // namespace detail

/// c = rows[first_row, first_row + c.rows()) · W[first_output, first_output + c.cols())ᵀ with
/// int8 operands and exact int32 sums, by vpdpbusd where the CPU has it and in int32 vectors,
/// with the same bits, where it has not. c is float, row-major with unit inner stride;
/// first_output is a multiple of 16 (a panel's first channel).
template <class C>
void int8_gemm(C&& c, const Int8Rows& rows, Index first_row, const Int8Weights& w, Index first_output) {
  detail::with_int8_form([&](auto form) { detail::int8_gemm(form, c, rows, first_row, w, first_output); });
}

}  // namespace moekit
