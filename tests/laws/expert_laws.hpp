#pragma once
// The laws every Expert keeps. Instantiate for your own expert in two lines:
//
//   using MyExperts = ::testing::Types<MyExpert>;
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, ExpertLaws, MyExperts, moekit::laws::CaseName);
//
// An expert whose products round their operands to bf16 runs in float, and its gradients are held
// to its exact twin's (tests/support/exact_twin.hpp) within bf16's rounding, since central
// differences of a rounded function measure the rounding.
#include <gtest/gtest.h>

#include <type_traits>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/gemm.hpp>

#include "../support/exact_twin.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "../support/tolerance.hpp"
#include "policy_case.hpp"

namespace moekit::laws {

using test::exact_twin;

/// Whether X's products round their operands to bf16, or quantise them to int8: it then runs in
/// float and is held to its exact twin within its precision's bound (int8: forward only).
template <class X>
constexpr bool rounds_to_bf16 = precision_of<X> == Precision::bf16;
template <class X>
constexpr bool quantises_to_int8 = precision_of<X> == Precision::int8;
template <class X>
constexpr bool approximates = rounds_to_bf16<X> || quantises_to_int8<X>;

template <class Case>
class ExpertLaws : public ::testing::Test {
 public:
  using X = policy_of<Case>;
  static_assert(Expert<X>, "an expert law case must make a type that models moekit::Expert");
  using T = std::conditional_t<approximates<X>, float, double>;
  const X expert = make_policy<Case>();

  /// The expert's parameters for `shape`, drawn from N(0, 0.5²).
  std::vector<Tensor<T>> weights(const LayerShape& shape, unsigned seed) const {
    std::vector<Tensor<T>> tensors;
    for (auto& spec : X::parameters(shape, shape.experts)) {
      tensors.emplace_back(spec.name, spec.shape);
      const Matrix<T> values = test::random_matrix<T>(tensors.back().size(), 1, seed++, 0.5);
      std::copy(values.data(), values.data() + values.size(), tensors.back().values().begin());
    }
    return tensors;
  }

  template <class S>
  struct Pass {
    Matrix<S> out, d_rows;
    std::vector<Tensor<S>> grads;
  };

  /// forward of rows by blocks `offsets`, then backward of d_out, by `of` (this expert, or its twin).
  /// An int8 expert is prepared from w first and runs forward only: its gradients stay zero.
  template <class S, class Of = X>
  static Pass<S> run(const std::vector<Tensor<S>>& w, const Matrix<S>& rows, const std::vector<Index>& offsets,
                     const Matrix<S>& d_out, const Of& of) {
    Pass<S> p;
    typename Of::template Saved<S> saved{};
    Workspace<S> workspace;
    p.out.resize(rows.rows(), rows.cols());
    for (const auto& t : w) p.grads.emplace_back(t.name(), t.shape());  // zero
    if constexpr (quantises_to_int8<Of>) {
      Of prepared = of;
      prepared.template prepare<S>(std::span<const Tensor<S>>(w));
      prepared.forward(std::span<const Tensor<S>>(w), ConstMatrixRef<S>(rows), std::span<const Index>(offsets),
                       MatrixRef<S>(p.out), saved, workspace);
    } else {
      of.forward(std::span<const Tensor<S>>(w), ConstMatrixRef<S>(rows), std::span<const Index>(offsets),
                 MatrixRef<S>(p.out), saved, workspace);
      p.d_rows = rows;
      of.backward(std::span<const Tensor<S>>(w), MatrixRef<S>(p.d_rows), std::span<const Index>(offsets), saved,
                  ConstMatrixRef<S>(d_out), std::span<Tensor<S>>(p.grads), workspace);
    }
    return p;
  }
  Pass<T> run(const std::vector<Tensor<T>>& w, const Matrix<T>& rows, const std::vector<Index>& offsets,
              const Matrix<T>& d_out) const {
    return run<T>(w, rows, offsets, d_out, expert);
  }
};

TYPED_TEST_SUITE_P(ExpertLaws);

// d_rows and every weight's gradient equal the central differences of L = Σ(out ⊙ d_out), over
// blocks of which one is empty.
TYPED_TEST_P(ExpertLaws, GradientsMatchCentralDifferences) {
  using T = typename TestFixture::T;
  if constexpr (approximates<typename TestFixture::X>) {
    // Its output, d_rows and gradients within bf16's rounding of the exact twin's (in double), over
    // blocks of which one is empty: each passes through at most three products, each off by about
    // 0.6 u relative (u = 2^-8), root mean square; 3 u. An int8 expert: its output within int8's
    // stated bound, 3% (docs/concepts.md#int8).
    const LayerShape shape{.hidden = 48, .ffn = 40, .experts = 3, .top_k = 1};
    this->expert.validate(shape);
    const std::vector<Index> offsets{0, 30, 30, 70};
    const auto w = this->weights(shape, 21);
    const Matrix<T> rows = test::random_matrix<T>(70, 48, 22), d_out = test::random_matrix<T>(70, 48, 23);
    const auto at = this->run(w, rows, offsets, d_out);
    std::vector<Tensor<double>> exact_w;
    for (const auto& t : w) {
      exact_w.emplace_back(t.name(), t.shape());
      std::copy(t.values().begin(), t.values().end(), exact_w.back().values().begin());
    }
    const typename exact_twin<typename TestFixture::X>::type twin{};
    const auto exact = TestFixture::template run<double>(exact_w, rows.template cast<double>(), offsets,
                                                         d_out.template cast<double>(), twin);
    const auto error = [](const auto& got, const auto& want) {
      return (got.template cast<double>() - want).norm() / want.norm();
    };
    EXPECT_GT(error(at.out, exact.out), 1e-5) << "out: no rounding seen";
    if constexpr (quantises_to_int8<typename TestFixture::X>) {
      EXPECT_LT(error(at.out, exact.out), test::int8_bound) << "out";
      return;
    }
    const double bound = 3 * test::bf16_unit;
    EXPECT_LT(error(at.out, exact.out), bound) << "out";
    EXPECT_LT(error(at.d_rows, exact.d_rows), bound) << "d_rows";
    for (std::size_t p = 0; p < w.size(); ++p)
      EXPECT_LT(error(at.grads[p].matrix(), exact.grads[p].matrix()), bound) << w[p].name();
  } else {
    // d_rows and every weight's gradient equal the central differences of L = Σ(out ⊙ d_out), over
    // blocks of which one is empty.
    const LayerShape shape{.hidden = 4, .ffn = 5, .experts = 3, .top_k = 1};
    this->expert.validate(shape);
    const std::vector<Index> offsets{0, 3, 3, 7};
    auto w = this->weights(shape, 21);
    Matrix<double> rows = test::random_matrix(7, 4, 22);
    const Matrix<double> d_out = test::random_matrix(7, 4, 23);
    const auto at = this->run(w, rows, offsets, d_out);
    auto loss = [&] {
      typename TestFixture::X::template Saved<double> saved{};
      Workspace<double> workspace;
      Matrix<double> out(rows.rows(), rows.cols());
      this->expert.forward(std::span<const Tensor<double>>(w), ConstMatrixRef<double>(rows),
                           std::span<const Index>(offsets), MatrixRef<double>(out), saved, workspace);
      return (out.array() * d_out.array()).sum();
    };
    std::span<double> row_values(rows.data(), static_cast<std::size_t>(rows.size()));
    EXPECT_LT(test::compare(std::vector<double>(at.d_rows.data(), at.d_rows.data() + at.d_rows.size()),
                            test::numeric_gradient(row_values, loss)),
              1e-6)
        << "d_rows";
    for (std::size_t p = 0; p < w.size(); ++p) {
      const auto grad = at.grads[p].values();
      auto values = w[p].values();
      EXPECT_LT(test::compare(std::vector<double>(grad.begin(), grad.end()), test::numeric_gradient(values, loss)),
                1e-6)
          << w[p].name();
    }
  }
}

// No rows at all, and experts with no rows, give nothing and no gradient.
TYPED_TEST_P(ExpertLaws, EmptyBlocksGiveNoGradient) {
  const LayerShape shape{.hidden = 4, .ffn = 5, .experts = 3, .top_k = 1};
  const auto w = this->weights(shape, 31);
  using T = typename TestFixture::T;
  const auto p = this->run(w, Matrix<T>(0, 4), {0, 0, 0, 0}, Matrix<T>(0, 4));
  for (const auto& g : p.grads)
    for (const T v : g.values()) EXPECT_EQ(v, T(0)) << g.name();
}

// The same output and gradients, bit for bit, on one thread and on four.
TYPED_TEST_P(ExpertLaws, SameBitsOnAnyThreadCount) {
  const LayerShape shape{.hidden = 64, .ffn = 96, .experts = 4, .top_k = 1};
  const auto w = this->weights(shape, 41);
  const std::vector<Index> offsets{0, 250, 251, 251, 600};
  using T = typename TestFixture::T;
  const Matrix<T> rows = test::random_matrix<T>(600, 64, 42), d_out = test::random_matrix<T>(600, 64, 43);
  const auto one = on_threads(1, [&] { return this->run(w, rows, offsets, d_out); });
  const auto four = on_threads(4, [&] { return this->run(w, rows, offsets, d_out); });
  EXPECT_TRUE(one.out == four.out);
  EXPECT_TRUE(one.d_rows == four.d_rows);
  for (std::size_t p = 0; p < w.size(); ++p)
    EXPECT_TRUE(std::ranges::equal(one.grads[p].values(), four.grads[p].values())) << w[p].name();
}

REGISTER_TYPED_TEST_SUITE_P(ExpertLaws, GradientsMatchCentralDifferences, EmptyBlocksGiveNoGradient,
                            SameBitsOnAnyThreadCount);

}  // namespace moekit::laws
