// Sinkhorn: the plan's rows and columns sum to 1/T and 1/E; huge logits give no NaN and no
// hang; the plan selects while the router's own scores weight; and it evens a skewed load.
#include <gtest/gtest.h>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

Matrix<double> plan_of(const Matrix<double>& logits, Sinkhorn::State<double>& state, Sinkhorn s = {}) {
  Matrix<double> selection = logits;
  s.select<double>(logits, {}, state, selection);  // scores are unused while active
  return selection;
}

TEST(Sinkhorn, PlanRowsSumToOneOverTAndColumnsToOneOverE) {
  // Megatron-Core's defaults (tolerance 1e-4). Its 1e-8 in the denominators moves the fixed
  // point by about 1e-7 relative; the rows carry the last iteration's remaining error.
  Sinkhorn::State<double> state;
  const auto plan = plan_of(random_matrix(40, 8, 1, 2.0), state);
  EXPECT_TRUE(state.converged);
  for (Index e = 0; e < 8; ++e) EXPECT_NEAR(plan.col(e).sum() * 8, 1.0, 1e-6);
  for (Index t = 0; t < 40; ++t) EXPECT_NEAR(plan.row(t).sum() * 40, 1.0, 1e-2);
}

TEST(Sinkhorn, LogitsOfTenThousandGiveNoNaNAndNoHang) {
  Matrix<double> logits = random_matrix(16, 4, 2);
  logits.col(0).setConstant(1e4);
  logits(3, 2) = -1e4;
  Sinkhorn::State<double> state;
  const auto plan = plan_of(logits, state, Sinkhorn{{.max_iterations = 50}});
  EXPECT_TRUE(plan.allFinite());
  EXPECT_LE(state.iterations, 50);
}

TEST(Sinkhorn, ARowShiftDoesNotChangeThePlan) {
  const auto logits = random_matrix(12, 5, 3);
  Matrix<double> shifted = logits;
  for (Index t = 0; t < 12; ++t) shifted.row(t).array() += 3.0 * double(t);
  Sinkhorn::State<double> a, b;
  EXPECT_LT((plan_of(logits, a) - plan_of(shifted, b)).cwiseAbs().maxCoeff(), 1e-15);
}

using Layer = MoELayer<TopK<2>, Sinkhorn, double>;
const TopK<2> megatron_weights{{.normalize = false}};  // softmax over all E, as Megatron-Core

TEST(Sinkhorn, PlanSelectsButTheRoutersScoresWeight) {
  Layer layer({.hidden = 6, .ffn = 5, .experts = 4, .seed = 1}, megatron_weights);
  const auto x = random_matrix(9, 6, 4);
  layer.forward(x);
  const Matrix<double> logits = x * layer.parameter("router.weight").matrix().transpose();
  for (Index t = 0; t < 9; ++t) {
    const Eigen::RowVectorXd p = (logits.row(t).array() - logits.row(t).maxCoeff()).exp().matrix();
    for (int k = 0; k < 2; ++k) {
      const auto c = static_cast<std::size_t>(2 * t + k);
      EXPECT_NEAR(layer.routing().weight[c], p(layer.routing().index[c]) / p.sum(), 1e-14);
    }
  }
  for (const auto& report : check_gradients(layer, x, random_matrix(9, 6, 5)))
    EXPECT_LT(report.error, 1e-6) << report.name;  // no gradient through the plan
}

TEST(Sinkhorn, EvensLoadThatPlainTopKLeavesSkewed) {
  auto skewed = [](auto& layer) {
    layer.parameter("router.weight").matrix().row(0).setConstant(0.5);
    layer.forward(random_matrix(64, 8, 6, 1.0).array() + 1.0);
    return layer.stats().max_over_mean;
  };
  MoELayer<TopK<2>, NoBalance, double> plain({.hidden = 8, .ffn = 4, .experts = 4, .seed = 2}, megatron_weights);
  Layer balanced({.hidden = 8, .ffn = 4, .experts = 4, .seed = 2}, megatron_weights);
  const double plain_skew = skewed(plain), sinkhorn_skew = skewed(balanced);
  EXPECT_GT(plain_skew, 1.8);
  EXPECT_LT(sinkhorn_skew, 1.3);
  // At evaluation: selection on the plain scores again, as Megatron-Core selects then.
  balanced.eval();
  EXPECT_EQ(skewed(balanced), plain_skew);
  balanced.train();
  EXPECT_LT(skewed(balanced), 1.3);
}

TEST(Sinkhorn, RejectsBadOptions) {
  EXPECT_THROW((Sinkhorn{{.tolerance = 0}}.validate({})), error);
  EXPECT_THROW((Sinkhorn{{.max_iterations = 0}}.validate({})), error);
}

}  // namespace
}  // namespace moekit::test
