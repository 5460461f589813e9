// Adam: the first step moves each parameter by the learning rate against its gradient's sign,
// and it minimises a quadratic.
#include <gtest/gtest.h>

#include <moekit/optim/adam.hpp>

namespace moekit::test {
namespace {

TEST(Adam, FirstStepIsLearningRateTimesSign) {
  std::vector<Tensor<double>> p{Tensor<double>("w", {3})}, g{Tensor<double>("w", {3})};
  g[0].values()[0] = 5, g[0].values()[1] = -0.1, g[0].values()[2] = 0;
  Adam<double> adam({.learning_rate = 0.01});
  adam.step(p, g);
  EXPECT_NEAR(p[0].values()[0], -0.01, 1e-9);
  EXPECT_NEAR(p[0].values()[1], 0.01, 1e-7);
  EXPECT_EQ(p[0].values()[2], 0.0);
}

TEST(Adam, MinimisesAQuadratic) {
  std::vector<Tensor<double>> p{Tensor<double>("w", {2})}, g{Tensor<double>("w", {2})};
  Adam<double> adam({.learning_rate = 0.05});
  for (int i = 0; i < 2000; ++i) {
    g[0].values()[0] = 2 * (p[0].values()[0] - 3);
    g[0].values()[1] = 2 * (p[0].values()[1] + 1);
    adam.step(p, g);
  }
  EXPECT_NEAR(p[0].values()[0], 3, 1e-3);
  EXPECT_NEAR(p[0].values()[1], -1, 1e-3);
}

TEST(Adam, RejectsBadOptions) {
  EXPECT_THROW(Adam<float>({.learning_rate = 0}), error);
  EXPECT_THROW(Adam<float>({.beta1 = 1.0}), error);
}

}  // namespace
}  // namespace moekit::test
