// AuxLoss: Megatron-Core's formula, equal to its coefficient at uniform routing, and its
// gradient into every logit.
#include <gtest/gtest.h>

#include <moekit/balance/aux_loss.hpp>
#include <moekit/balance/no_balance.hpp>
#include <moekit/router/top_k.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

Matrix<double> scores_of(Matrix<double> logits, ScoreFn f) {
  TopK<2>{{.score = f}}.score(MatrixRef<double>(logits));
  return logits;
}

TEST(AuxLoss, EqualsItsCoefficientAtUniformRouting) {
  // Every token scores every expert alike and the top-2 choices cover each expert equally.
  const Index tokens = 8, experts = 4;
  Matrix<double> logits = Matrix<double>::Zero(tokens, experts);
  for (Index t = 0; t < tokens; ++t) {  // tiny nudges spread the choices evenly
    logits(t, (2 * t) % experts) = 1e-9;
    logits(t, (2 * t + 1) % experts) = 1e-9;
  }
  const AuxLoss aux{{.coefficient = 0.01}};
  AuxLoss::State<double> state;
  const auto loss = aux.forward<double>(scores_of(logits, ScoreFn::softmax), {ScoreFn::softmax, 2}, state);
  EXPECT_NEAR(loss, 0.01, 1e-9);
  for (Index n : state.counts) EXPECT_EQ(n, 4);
}

TEST(AuxLoss, MatchesTheFormulaOnSkewedRouting) {
  // Two tokens, three experts, top-1: hand-computed.
  Matrix<double> logits(2, 3);
  logits << 2.0, 0.0, 0.0, 1.0, 0.0, 0.0;
  const Matrix<double> s = scores_of(logits, ScoreFn::softmax);
  AuxLoss::State<double> state;
  const double loss = AuxLoss{{.coefficient = 1.0}}.forward<double>(s, {ScoreFn::softmax, 1}, state);
  // n = [2,0,0]; L = E/(K·T²) · n_0 · (s_00 + s_10) = 3/4 · 2 · (s_00 + s_10)
  EXPECT_NEAR(loss, 0.75 * 2 * (s(0, 0) + s(1, 0)), 1e-15);
}

void expect_gradient_matches_differences(ScoreFn f, int k) {
  Matrix<double> logits = random_matrix(9, 5, 3);
  const AuxLoss aux{{.coefficient = 0.3}};
  const BalanceContext context{f, k};
  AuxLoss::State<double> state;
  auto loss = [&](const Matrix<double>& l) { return aux.forward<double>(scores_of(l, f), context, state); };
  loss(logits);
  Matrix<double> d_logits = Matrix<double>::Zero(9, 5);
  aux.backward<double>(scores_of(logits, f), context, state, d_logits);
  std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
  const auto numeric = numeric_gradient(values, [&] { return loss(logits); });
  for (std::size_t i = 0; i < numeric.size(); ++i)
    EXPECT_NEAR(d_logits.data()[i], numeric[i], 1e-9) << to_string(f) << " logit " << i;
}

TEST(AuxLoss, GradientMatchesFiniteDifferences) {
  expect_gradient_matches_differences(ScoreFn::softmax, 2);
  expect_gradient_matches_differences(ScoreFn::sigmoid, 2);
  expect_gradient_matches_differences(ScoreFn::softmax, 1);
}

TEST(AuxLoss, RejectsANegativeCoefficient) {
  EXPECT_THROW(AuxLoss{{.coefficient = -1}}.validate({}), error);
  EXPECT_THROW(AuxLoss{{.coefficient = NAN}}.validate({}), error);
}

TEST(NoBalance, HasNoLossAndNoGradient) {
  Matrix<double> s = Matrix<double>::Constant(3, 4, 0.25), d = Matrix<double>::Zero(3, 4);
  NoBalance::State<double> state;
  EXPECT_EQ(NoBalance{}.forward<double>(s, {}, state), 0.0);
  NoBalance{}.backward<double>(s, {}, state, d);
  EXPECT_TRUE(d.isZero(0));
}

}  // namespace
}  // namespace moekit::test
