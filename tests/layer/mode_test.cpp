// train() and eval(): what changes at evaluation (no load counted, Sinkhorn on the plain scores,
// backward refused) and what does not (forward's output bit for bit where no policy reads the mode).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/random.hpp"

namespace moekit::test {
namespace {

const LayerConfig config{.hidden = 8, .ffn = 6, .experts = 4, .seed = 3};

template <class Layer>
concept CanTrain = requires(Layer& layer) { layer.train(); };

TEST(Mode, TrainingByDefaultAndForwardTheSameInBothModes) {
  MoELayer<TopK<2>, AuxLoss> layer(config);
  EXPECT_TRUE(layer.training());
  const Matrix<float> x = random_matrix<float>(12, 8, 1);
  const Matrix<float> trained = layer.forward(x);
  const double loss = layer.balance_loss();
  layer.eval();
  EXPECT_FALSE(layer.training());
  EXPECT_EQ(Matrix<float>(layer.forward(x)), trained);
  EXPECT_EQ(layer.balance_loss(), loss) << "the loss is still reported, as a statistic";
}

TEST(Mode, BackwardIsRefusedAtEvaluation) {
  MoELayer<TopK<2>> layer(config);
  const Matrix<float> x = random_matrix<float>(5, 8, 2);
  layer.eval();
  layer.forward(x);
  try {
    layer.backward(x);
    ADD_FAILURE() << "backward ran at evaluation";
  } catch (const error& e) {
    EXPECT_EQ(std::string(e.what()),
              "moekit::MoELayer::backward: the layer is in evaluation mode; expected train() before a training "
              "step's forward and backward");
  }
  layer.train();
  layer.forward(x);
  EXPECT_EQ(layer.backward(x).rows(), 5);
}

// AuxFree counts the load of training forwards only: evaluation between steps leaves its bias
// where the training steps put it.
TEST(Mode, AuxFreeCountsOnlyTrainingForwards) {
  using Layer = MoELayer<TopK<2>, AuxFree>;
  const Matrix<float> x = random_matrix<float>(32, 8, 3);
  Layer evaluated(config), trained(config);
  evaluated.eval();
  evaluated.forward(x);
  evaluated.end_step();
  for (double b : evaluated.balance_state().bias) EXPECT_EQ(b, 0.0);
  for (Index n : evaluated.balance_state().counts) EXPECT_EQ(n, 0);
  trained.forward(x);
  trained.end_step();
  double moved = 0;
  for (double b : trained.balance_state().bias) moved += std::abs(b);
  EXPECT_GT(moved, 0.0) << "a training step moves the bias";
  const std::vector<double> after_step = trained.balance_state().bias;
  trained.eval();
  trained.forward(x);
  trained.end_step();
  EXPECT_EQ(trained.balance_state().bias, after_step);
}

TEST(Mode, Int8LayersOnlyEvaluate) {
  MoELayer<TopK<2>, int8> served(config);
  EXPECT_FALSE(served.training());
  static_assert(!CanTrain<MoELayer<TopK<2>, int8>>, "an int8 layer cannot train");
  static_assert(CanTrain<MoELayer<TopK<2>>>);
}

}  // namespace
}  // namespace moekit::test
