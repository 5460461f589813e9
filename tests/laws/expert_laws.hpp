#pragma once
// The laws every Expert keeps. Instantiate for your own expert in two lines:
//
//   using MyExperts = ::testing::Types<MyExpert>;
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, ExpertLaws, MyExperts, moekit::laws::CaseName);
#include <gtest/gtest.h>

#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/gemm.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "policy_case.hpp"

namespace moekit::laws {

template <class Case>
class ExpertLaws : public ::testing::Test {
 public:
  using X = policy_of<Case>;
  static_assert(Expert<X>, "an expert law case must make a type that models moekit::Expert");
  const X expert = make_policy<Case>();

  /// The expert's parameters for `shape`, drawn from N(0, 0.5²).
  std::vector<Tensor<double>> weights(const LayerShape& shape, unsigned seed) const {
    std::vector<Tensor<double>> tensors;
    for (auto& spec : X::parameters(shape, shape.experts)) {
      tensors.emplace_back(spec.name, spec.shape);
      const Matrix<double> values = test::random_matrix(tensors.back().size(), 1, seed++, 0.5);
      std::copy(values.data(), values.data() + values.size(), tensors.back().values().begin());
    }
    return tensors;
  }

  struct Pass {
    Matrix<double> out, d_rows;
    std::vector<Tensor<double>> grads;
  };

  /// forward of rows by blocks `offsets`, then backward of d_out.
  Pass run(const std::vector<Tensor<double>>& w, const Matrix<double>& rows, const std::vector<Index>& offsets,
           const Matrix<double>& d_out) const {
    Pass p;
    typename X::template Saved<double> saved{};
    Workspace<double> workspace;
    p.out.resize(rows.rows(), rows.cols());
    expert.forward(std::span<const Tensor<double>>(w), ConstMatrixRef<double>(rows), std::span<const Index>(offsets),
                   MatrixRef<double>(p.out), saved, workspace);
    for (const auto& t : w) p.grads.emplace_back(t.name(), t.shape());  // zero
    p.d_rows = rows;
    expert.backward(std::span<const Tensor<double>>(w), MatrixRef<double>(p.d_rows), std::span<const Index>(offsets),
                    saved, ConstMatrixRef<double>(d_out), std::span<Tensor<double>>(p.grads), workspace);
    return p;
  }
};

TYPED_TEST_SUITE_P(ExpertLaws);

// d_rows and every weight's gradient equal the central differences of L = Σ(out ⊙ d_out), over
// blocks of which one is empty.
TYPED_TEST_P(ExpertLaws, GradientsMatchCentralDifferences) {
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
    EXPECT_LT(test::compare(std::vector<double>(grad.begin(), grad.end()), test::numeric_gradient(values, loss)), 1e-6)
        << w[p].name();
  }
}

// No rows at all, and experts with no rows, give nothing and no gradient.
TYPED_TEST_P(ExpertLaws, EmptyBlocksGiveNoGradient) {
  const LayerShape shape{.hidden = 4, .ffn = 5, .experts = 3, .top_k = 1};
  const auto w = this->weights(shape, 31);
  const auto p = this->run(w, Matrix<double>(0, 4), {0, 0, 0, 0}, Matrix<double>(0, 4));
  for (const auto& g : p.grads)
    for (const double v : g.values()) EXPECT_EQ(v, 0.0) << g.name();
}

// The same output and gradients, bit for bit, on one thread and on four.
TYPED_TEST_P(ExpertLaws, SameBitsOnAnyThreadCount) {
  const LayerShape shape{.hidden = 64, .ffn = 96, .experts = 4, .top_k = 1};
  const auto w = this->weights(shape, 41);
  const std::vector<Index> offsets{0, 250, 251, 251, 600};
  const Matrix<double> rows = test::random_matrix(600, 64, 42), d_out = test::random_matrix(600, 64, 43);
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
