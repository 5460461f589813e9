// The router's options the layer carries out. Weights that scale the experts' input (TopK's
// weight_at = WeightAt::input, Llama 4's rule): y = Σ_k expert_k(w_k · x), against plain loops;
// every gradient by central differences, with and without a shared expert and with a capacity
// that drops and renormalises. A bias in the logits (logit_bias, GPT-OSS's): its routing, its
// gradient, and the refusal to change it after construction.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

constexpr LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .seed = 2};

/// expert e of the layer on one input row, from the formula.
template <class Layer>
Eigen::RowVectorXd expert_by_hand(const Layer& layer, Index e, const Eigen::RowVectorXd& x) {
  const auto gate = layer.parameter("experts.gate").slice(e), up = layer.parameter("experts.up").slice(e);
  const auto down = layer.parameter("experts.down").slice(e);
  const Eigen::RowVectorXd g = x * gate.transpose(), u = x * up.transpose();
  const Eigen::RowVectorXd h = (g.array() / (1 + (-g.array()).exp()) * u.array()).matrix();
  return h * down.transpose();
}

template <int K>
void expect_sum_of_experts_on_scaled_inputs(typename TopK<K>::Options options) {
  options.weight_at = WeightAt::input;
  MoELayer<TopK<K>, NoBalance, double> layer(config, TopK<K>{options});
  const Matrix<double> x = random_matrix(9, config.hidden, 3);
  const Matrix<double> y = layer.forward(x);
  Matrix<double> expected = Matrix<double>::Zero(x.rows(), x.cols());
  const auto& routing = layer.routing();
  for (Index t = 0; t < x.rows(); ++t)
    for (int k = 0; k < K; ++k) {
      const auto c = static_cast<std::size_t>(t * K + k);
      expected.row(t) += expert_by_hand(layer, routing.index[c], routing.weight[c] * x.row(t));
    }
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), 1e-13);

  options.weight_at = WeightAt::output;  // SwiGLU is not linear: the other rule gives another y
  layer.router() = TopK<K>{options};
  EXPECT_GT((layer.forward(x) - y).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(WeightAtInput, IsTheSumOfTheExpertsOnScaledInputs) {
  expect_sum_of_experts_on_scaled_inputs<1>({.score = ScoreFn::sigmoid, .normalize = false});  // Llama 4
  expect_sum_of_experts_on_scaled_inputs<2>({});
}

template <class Layer, class... Policies>
void expect_gradients(const LayerConfig& c, const Policies&... policies) {
  Layer layer(c, policies...);
  const auto reports = check_gradients(layer, random_matrix(8, c.hidden, 4), random_matrix(8, c.hidden, 5));
  for (const auto& r : reports) EXPECT_LT(r.error, 1e-6) << Layer::name() << " " << r.name;
}

TEST(WeightAtInput, GradientsMatchFiniteDifferences) {
  LayerConfig llama = config;
  llama.shared_ffn = 7;
  expect_gradients<MoELayer<TopK<1>, NoBalance, Shared<>, double>>(
      llama, TopK<1>{{.score = ScoreFn::sigmoid, .normalize = false, .weight_at = WeightAt::input}});
  expect_gradients<MoELayer<TopK<2>, AuxLoss, Capacity, double>>(
      config, TopK<2>{{.weight_at = WeightAt::input}}, Capacity{{.capacity_factor = 0.75, .renormalize = true}});
}

TEST(LogitBias, RoutesByTheBiasedLogits) {
  MoELayer<TopK<2>, NoBalance, double> layer(config, TopK<2>{{.logit_bias = true}});
  ASSERT_EQ(layer.parameters()[1].name(), "router.logit_bias");
  auto& bias = layer.parameter("router.logit_bias");
  const double pulls[] = {0, 0, 5, -5};  // expert 2 pulled in, expert 3 pushed out
  std::copy(std::begin(pulls), std::end(pulls), bias.values().begin());
  const Matrix<double> x = random_matrix(16, config.hidden, 6);
  layer.forward(x);
  const auto& w = layer.parameter("router.weight").matrix();
  for (Index t = 0; t < x.rows(); ++t) {
    Eigen::RowVectorXd logits = x.row(t) * w.transpose();
    logits += bias.matrix();
    Index first = 0, second = 0;
    logits.maxCoeff(&first);
    logits(first) = -INFINITY;
    logits.maxCoeff(&second);
    EXPECT_EQ(layer.routing().index[static_cast<std::size_t>(2 * t)], first) << t;
    EXPECT_EQ(layer.routing().index[static_cast<std::size_t>(2 * t + 1)], second) << t;
  }
}

TEST(LogitBias, GradientsMatchFiniteDifferences) {
  expect_gradients<MoELayer<TopK<2>, AuxLoss, Dropless, double>>(config, TopK<2>{{.logit_bias = true}});
  expect_gradients<MoELayer<TopK<1>, NoBalance, Dropless, double>>(
      config, TopK<1>{{.score = ScoreFn::sigmoid, .normalize = false, .logit_bias = true}});
}

TEST(LogitBias, CannotBeChangedAfterConstruction) {
  MoELayer<TopK<2>, NoBalance, double> layer(config);
  layer.router().options.logit_bias = true;
  try {
    layer.forward(random_matrix(3, config.hidden, 7));
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_STREQ(e.what(), "moekit::MoELayer: the router's logit_bias is now true; expected false as when the layer "
                           "was built (router.logit_bias is a parameter only if it was)");
  }
}

}  // namespace
}  // namespace moekit::test
