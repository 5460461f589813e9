#pragma once
// The laws every Balancer keeps, and those of the optional hooks it models. Instantiate for your
// own balancer in two lines:
//
//   using MyBalancers = ::testing::Types<MyBalancer>;
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, BalancerLaws, MyBalancers, moekit::laws::CaseName);
//
// The balancer is run beside a TopK<2> router (softmax) over one process's batch; one that reads
// noisy gating's logits gets them as the layer makes them, from fixed noise logits and draws.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/router/top_k.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "policy_case.hpp"

namespace moekit::laws {

/// Whether a case's balancer runs as in a training forward (the default) or at evaluation, after
/// the layer's eval(): a case says `static constexpr bool training = false`.
template <class Case>
constexpr bool case_trains = [] {
  if constexpr (requires { Case::training; })
    return Case::training;
  else
    return true;
}();

template <class Case>
class BalancerLaws : public ::testing::Test {
 public:
  using B = policy_of<Case>;
  static_assert(Balancer<B>, "a balancer law case must make a type that models moekit::Balancer");
  const B balancer = make_policy<Case>();
  const TopK<2> router{};
  const BalanceContext context{.score = ScoreFn::softmax, .top_k = 2, .training = case_trains<Case>};

  struct Step {
    Routing<double> routing;
    double loss = 0;
    Matrix<double> selection, d_logits;
  };

  /// One forward and backward of the router and the balancer, as the layer runs them, from a
  /// fresh state: noisy gating's noise if the balancer reads it, score, select (the balancer's,
  /// if it has one, then the router's), the loss, the kept counts if it counts them, and the
  /// loss's gradient in the (clean) logits, through the weights if it reads them.
  Step run(const Matrix<double>& logits) const {
    typename B::template State<double> state{};
    BalanceContext context = this->context;
    context.experts = logits.cols();
    Step s;
    Matrix<double> noisy = logits, noise;  // H = logits + n ⊙ softplus(noise), as the layer's noisy gating
    if constexpr (BalancerReadsNoisyLogits<B, double>) {
      noise = test::random_matrix(logits.rows(), logits.cols(), 14);
      noisy += test::random_matrix(logits.rows(), logits.cols(), 15).cwiseProduct(noise.unaryExpr(&softplus<double>));
      balancer.noisy_logits(NoisyLogits<double>{logits, noisy, noise}, context, state);
    }
    Matrix<double> scores = noisy;
    if constexpr (BalancerReadsLogits<B, double>) balancer.logits(ConstMatrixRef<double>(noisy), context, state);
    router.score(MatrixRef<double>(scores));
    if constexpr (BalancerSelects<B, double>) {
      s.selection = noisy;
      balancer.select(ConstMatrixRef<double>(scores), context, state, MatrixRef<double>(s.selection));
      router.select(ConstMatrixRef<double>(s.selection), ConstMatrixRef<double>(scores), s.routing);
    } else {
      router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), s.routing);
    }
    if constexpr (BalancerReadsWeights<B, double>) balancer.weights(s.routing, context, state);
    s.loss = balancer.forward(ConstMatrixRef<double>(scores), context, state);
    if constexpr (BalancerCountsLoad<B, double>) {
      std::vector<Index> load(static_cast<std::size_t>(logits.cols()), 0);
      for (const Index e : s.routing.index) ++load[static_cast<std::size_t>(e)];
      balancer.routed(std::span<const Index>(load), state);
    }
    s.d_logits = Matrix<double>::Zero(logits.rows(), logits.cols());
    if constexpr (BalancerReadsWeights<B, double>) {
      std::vector<double> d_weight(s.routing.weight.size(), 0.0);
      balancer.weights_backward(s.routing, context, state, std::span<double>(d_weight));
      router.backward(ConstMatrixRef<double>(scores), s.routing, std::span<const double>(d_weight),
                      MatrixRef<double>(s.d_logits));
    }
    balancer.backward(ConstMatrixRef<double>(scores), context, state, MatrixRef<double>(s.d_logits));
    if constexpr (BalancerReadsNoisyLogits<B, double>) {  // d(H) is d(logits), and the term's own share
      Matrix<double> d_clean = Matrix<double>::Zero(logits.rows(), logits.cols()), d_noise = d_clean;
      balancer.noisy_logits_backward(NoisyLogits<double>{logits, noisy, noise}, context, state,
                                     MatrixRef<double>(s.d_logits), MatrixRef<double>(d_clean),
                                     MatrixRef<double>(d_noise));
      s.d_logits += d_clean;
    }
    return s;
  }
};

TYPED_TEST_SUITE_P(BalancerLaws);

// The loss is finite, and its gradient in the logits equals the central differences.
TYPED_TEST_P(BalancerLaws, LossGradientMatchesCentralDifferences) {
  const Index experts = 5;
  this->balancer.validate({.hidden = 4, .ffn = 4, .experts = experts, .top_k = 2});
  Matrix<double> logits = test::random_matrix(7, experts, 11, 2.0);
  const auto at = this->run(logits);
  EXPECT_TRUE(std::isfinite(at.loss));
  std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
  const auto numeric = test::numeric_gradient(values, [&] { return this->run(logits).loss; });
  EXPECT_LT(test::compare(std::vector<double>(at.d_logits.data(), at.d_logits.data() + at.d_logits.size()), numeric),
            1e-6);
}

// A balancer that selects leaves the router K distinct experts to pick, on finite scores.
TYPED_TEST_P(BalancerLaws, SelectionLeavesKDistinctChoices) {
  const Index tokens = 300, experts = 6;
  const auto s = this->run(test::random_matrix(tokens, experts, 12, 2.0));
  if constexpr (BalancerSelects<typename TestFixture::B, double>) {
    EXPECT_TRUE(s.selection.allFinite());
  }
  for (Index t = 0; t < tokens; ++t) {
    const std::set<Index> chosen{s.routing.index[static_cast<std::size_t>(2 * t)],
                                 s.routing.index[static_cast<std::size_t>(2 * t + 1)]};
    EXPECT_EQ(chosen.size(), 2u) << "token " << t;
  }
}

// The same loss, selection and gradient, bit for bit, on one thread and on four.
TYPED_TEST_P(BalancerLaws, SameBitsOnAnyThreadCount) {
  const Matrix<double> logits = test::random_matrix(1000, 9, 13, 2.0);
  const auto one = on_threads(1, [&] { return this->run(logits); });
  const auto four = on_threads(4, [&] { return this->run(logits); });
  EXPECT_EQ(one.loss, four.loss);
  EXPECT_EQ(one.routing.index, four.routing.index);
  EXPECT_TRUE(one.selection == four.selection);
  EXPECT_TRUE(one.d_logits == four.d_logits);
}

// State that saves with the layer comes back as it was saved; a balancer that names saved state
// has the whole hook.
TYPED_TEST_P(BalancerLaws, SavedStateComesBackAsSaved) {
  using B = typename TestFixture::B;
  if constexpr (SavesState<B, double>) {
    const std::vector<double> values{0.5, -1.0, 0.0, 2.25, -0.125};
    typename B::template State<double> state{};
    this->balancer.restore(values, state);
    const auto saved = this->balancer.saved(state);
    EXPECT_EQ(std::vector<double>(saved.begin(), saved.end()), values);
  } else {
    EXPECT_FALSE(requires { B::saved_name; }) << B::name << " names saved state but does not model SavesState";
  }
}

REGISTER_TYPED_TEST_SUITE_P(BalancerLaws, LossGradientMatchesCentralDifferences, SelectionLeavesKDistinctChoices,
                            SameBitsOnAnyThreadCount, SavedStateComesBackAsSaved);

}  // namespace moekit::laws
