// ZLoss: ST-MoE's formula on the logits (whatever the score function), its gradient through a
// whole layer, and what it is for: trained on alone, it shrinks the logits.
#include <gtest/gtest.h>

#include <cmath>

#include <moekit/moekit.hpp>

#include "../support/random.hpp"
#include "../support/reference.hpp"

namespace moekit::test {
namespace {

/// c · mean_t (log Σ_e exp l_te)², computed plainly.
double z_loss_by_hand(const Matrix<double>& logits, double c) { return c * reference_z_loss(logits); }

TEST(ZLoss, IsTheMeanSquaredLogSumExpOfTheLogits) {
  const Matrix<double> logits = random_matrix(9, 5, 1, 3.0);
  const ZLoss z{{.coefficient = 0.25}};
  ZLoss::State<double> state;
  z.logits<double>(logits, {}, state);
  const Matrix<double> scores = Matrix<double>::Zero(9, 5);  // not read: the loss is the logits'
  EXPECT_NEAR(z.forward<double>(scores, {}, state), z_loss_by_hand(logits, 0.25), 1e-15);
  // Large logits stay finite: LSE is taken around each row's largest.
  const Matrix<double> large = Matrix<double>::Constant(2, 4, 800.0);
  z.logits<double>(large, {}, state);
  EXPECT_NEAR(z.forward<double>(Matrix<double>::Zero(2, 4), {}, state), 0.25 * std::pow(800.0 + std::log(4.0), 2), 1e-9);
}

// In a layer, with a sigmoid router too (the loss reads the logits, not the scores).
TEST(ZLoss, ALayerReportsItForEitherScoreFunction) {
  for (const ScoreFn score : {ScoreFn::softmax, ScoreFn::sigmoid}) {
    MoELayer<TopK<2>, ZLoss, double> layer({.hidden = 6, .ffn = 4, .experts = 5, .seed = 2},
                                           TopK<2>{{.score = score}}, ZLoss{{.coefficient = 0.1}});
    const Matrix<double> x = random_matrix(11, 6, 3);
    layer.forward(x);
    const Matrix<double> logits = x * std::as_const(layer).parameter("router.weight").matrix().transpose();
    EXPECT_NEAR(layer.balance_loss(), z_loss_by_hand(logits, 0.1), 1e-14) << to_string(score);
    EXPECT_EQ(layer.stats().balance_terms.front().first, "ZLoss");
  }
}

// Trained on the z-loss alone (dy = 0), Adam shrinks the router's logits: what ST-MoE adds it for.
TEST(ZLoss, TrainingOnItShrinksTheLogits) {
  MoELayer<TopK<2>, ZLoss, double> layer({.hidden = 8, .ffn = 4, .experts = 4, .seed = 4}, ZLoss{{.coefficient = 1.0}});
  for (double& w : layer.parameter("router.weight").values()) w *= 20;  // logits of about ±10
  const Matrix<double> x = random_matrix(64, 8, 5);
  const Matrix<double> dy = Matrix<double>::Zero(64, 8);
  Adam<double> adam({.learning_rate = 0.05});
  layer.forward(x);
  const double first = layer.balance_loss();
  for (int step = 0; step < 100; ++step) {
    layer.zero_grad();
    layer.forward(x);
    layer.backward(dy);
    adam.step(layer.parameters(), layer.gradients());
  }
  layer.forward(x);
  EXPECT_GT(first, 10.0);
  EXPECT_LT(layer.balance_loss(), 0.1 * first);
}

TEST(ZLoss, RejectsABadCoefficient) {
  EXPECT_THROW((ZLoss{{.coefficient = -1}}.validate({})), error);
  EXPECT_THROW((ZLoss{{.coefficient = NAN}}.validate({})), error);
}

}  // namespace
}  // namespace moekit::test
