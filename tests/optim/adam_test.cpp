// Adam: the first step moves each parameter by the learning rate against its gradient's sign,
// and it minimises a quadratic.
#include <gtest/gtest.h>

#include <algorithm>

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

TEST(Adam, AStepRefusedForASizeMismatchChangesNothing) {
  std::vector<Tensor<double>> p{Tensor<double>("a", {2}), Tensor<double>("b", {3})};
  std::vector<Tensor<double>> g{Tensor<double>("a", {2}), Tensor<double>("b", {3})};
  for (auto& t : g) std::fill(t.values().begin(), t.values().end(), 1.0);
  Adam<double> adam({.learning_rate = 0.1});
  adam.step(p, g);
  const std::vector<double> a(p[0].values().begin(), p[0].values().end());
  std::vector<Tensor<double>> wrong{Tensor<double>("a", {2}), Tensor<double>("b", {4})};
  EXPECT_THROW(adam.step(p, wrong), error);
  EXPECT_TRUE(std::ranges::equal(a, p[0].values())) << "'a' was updated by a refused step";
  EXPECT_EQ(adam.steps(), 1) << "a refused step was counted";
}

}  // namespace
}  // namespace moekit::test
