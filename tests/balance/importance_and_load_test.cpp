// Shazeer et al.'s importance and load losses, as policies alone: CV² and its gradient; the
// importance of hand-made choices; the load against the paper's kth_excluding, its gradients by
// central differences, and its meaning — the chance of being chosen under fresh noise — by
// drawing that noise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "../support/reference.hpp"

namespace moekit::test {
namespace {

TEST(CvSquared, IsThePopulationVarianceOverTheSquaredMean) {
  const std::vector<double> v{1, 2, 3, 6};  // mean 3, variance (4 + 1 + 0 + 9) / 4
  EXPECT_NEAR(detail::CvSquared::value(v), 3.5 / (9 + 1e-10), 1e-15);
  EXPECT_EQ(detail::CvSquared::value(std::vector<double>{2, 2, 2}), 0.0);
}

TEST(CvSquared, GradientMatchesCentralDifferences) {
  std::vector<double> v{0.5, 2.0, 1.25, 3.0, 0.75};
  std::vector<double> g(v.size());
  detail::CvSquared::gradient(v, g);
  const auto numeric = numeric_gradient(v, [&] { return detail::CvSquared::value(v); });
  for (std::size_t i = 0; i < v.size(); ++i) EXPECT_NEAR(g[i], numeric[i], 1e-8) << i;
}

// Three tokens, two choices each, three experts; the second token's second choice left empty.
Routing<double> hand_routing() {
  Routing<double> r;
  r.resize(3, 2);
  r.index = {0, 1, 2, Routing<double>::left_empty(0), 0, 2};
  r.weight = {0.6, 0.4, 0.9, 0.0, 0.3, 0.7};
  return r;
}

TEST(ImportanceLoss, IsCvSquaredOfEachExpertsSummedWeights) {
  const ImportanceLoss loss{{.coefficient = 0.5}};
  ImportanceLoss::State<double> state;
  const BalanceContext context{.top_k = 2, .experts = 3};
  loss.weights(hand_routing(), context, state);
  EXPECT_EQ(state.importance.sum, (std::vector<double>{0.6 + 0.3, 0.4, 0.9 + 0.7}));  // the empty choice adds nothing
  const Matrix<double> unused(3, 3);
  EXPECT_NEAR(loss.forward<double>(unused, context, state), 0.5 * detail::CvSquared::value(state.importance.sum), 1e-15);
}

TEST(ImportanceLoss, WeightGradientMatchesCentralDifferences) {
  const ImportanceLoss loss{{.coefficient = 0.5}};
  const BalanceContext context{.top_k = 2, .experts = 3};
  Routing<double> routing = hand_routing();
  ImportanceLoss::State<double> state;
  const Matrix<double> unused(3, 3);
  auto value = [&] {
    loss.weights(routing, context, state);
    return double(loss.forward<double>(unused, context, state));
  };
  value();
  std::vector<double> d_weight(routing.weight.size(), 0.0);
  loss.weights_backward(routing, context, state, std::span<double>(d_weight));
  const auto numeric = numeric_gradient(routing.weight, value);
  for (std::size_t c = 0; c < d_weight.size(); ++c) {
    const double expected = Routing<double>::is_empty(routing.index[c]) ? 0.0 : numeric[c];
    EXPECT_NEAR(d_weight[c], expected, 1e-8) << "choice " << c;
  }
}

/// Random clean, noise and noisy logits for 7 tokens and 5 experts.
struct Logits {
  Matrix<double> clean = random_matrix(7, 5, 1), noise = random_matrix(7, 5, 2), noisy;
  Logits() : noisy(clean + random_matrix(7, 5, 3)) {}
  NoisyLogits<double> view() const { return {clean, noisy, noise}; }
};

/// The paper's Load_i, by sorting (tests/support/reference.hpp).
std::vector<double> load_by_hand(const Logits& l, int k) { return reference_load(l.clean, l.noisy, l.noise, k); }

TEST(LoadLoss, IsCvSquaredOfTheLoadByKthExcluding) {
  const LoadLoss loss{{.coefficient = 0.5}};
  const Logits logits;
  const Matrix<double> unused(7, 5);
  for (int k : {1, 2, 4}) {
    LoadLoss::State<double> state;
    const BalanceContext context{.top_k = k, .experts = 5};
    loss.noisy_logits(logits.view(), context, state);
    const auto expected = load_by_hand(logits, k);
    for (std::size_t e = 0; e < expected.size(); ++e) EXPECT_NEAR(state.load.sum[e], expected[e], 1e-13) << "K " << k;
    EXPECT_NEAR(loss.forward<double>(unused, context, state), 0.5 * detail::CvSquared::value(expected), 1e-13);
  }
}

TEST(LoadLoss, GradientsMatchCentralDifferences) {
  const LoadLoss loss{{.coefficient = 0.5}};
  const BalanceContext context{.top_k = 2, .experts = 5};
  Logits logits;
  LoadLoss::State<double> state;
  const Matrix<double> unused(7, 5);
  auto value = [&] {
    loss.noisy_logits(logits.view(), context, state);
    return double(loss.forward<double>(unused, context, state));
  };
  value();
  Matrix<double> d_noisy = Matrix<double>::Zero(7, 5), d_clean = d_noisy, d_noise = d_noisy;
  loss.noisy_logits_backward<double>(logits.view(), context, state, d_noisy, d_clean, d_noise);
  const auto check = [&](Matrix<double>& m, const Matrix<double>& d, const char* what) {
    std::span<double> entries(m.data(), static_cast<std::size_t>(m.size()));
    const auto numeric = numeric_gradient(entries, value);
    for (std::size_t i = 0; i < numeric.size(); ++i) EXPECT_NEAR(d.data()[i], numeric[i], 1e-8) << what << " " << i;
  };
  check(logits.clean, d_clean, "clean");
  check(logits.noise, d_noise, "noise");
  check(logits.noisy, d_noisy, "noisy");
  EXPECT_GT(d_noisy.norm(), 0) << "the thresholds carry gradient";
}

// P_ti is the chance that expert i is among the K largest if its own noise alone is drawn again:
// the fraction over 20 000 fresh standard normal draws is within 5σ of it, for every expert.
TEST(LoadLoss, ProbabilityIsTheChanceOfBeingChosenUnderFreshNoise) {
  const LoadLoss loss{};
  const Logits logits;
  const int k = 2;
  const BalanceContext context{.top_k = k, .experts = 5};
  const Index t = 3, draws = 20000;
  // Token t alone: its load is its P.
  const Matrix<double> clean = logits.clean.row(t), noise = logits.noise.row(t), noisy = logits.noisy.row(t);
  LoadLoss::State<double> state;
  loss.noisy_logits(NoisyLogits<double>{clean, noisy, noise}, context, state);
  for (Index i = 0; i < 5; ++i) {
    Index chosen = 0;
    for (Index d = 0; d < draws; ++d) {
      Matrix<double> h = noisy;
      h(0, i) = clean(0, i) + random_normal({.seed = 11, .token = d, .lane = i}) * std::log1p(std::exp(noise(0, i)));
      Index above = 0;  // experts whose H beats i's
      for (Index j = 0; j < 5; ++j) above += j != i && h(0, j) > h(0, i);
      chosen += above < k;
    }
    const double p = state.load.sum[static_cast<std::size_t>(i)];
    const double sigma = std::sqrt(p * (1 - p) / double(draws));
    EXPECT_NEAR(double(chosen) / double(draws), p, 5 * sigma + 1e-9) << "expert " << i;
  }
}

TEST(LoadLoss, RefusesARouterWithoutNoisyGatingAndEveryExpertChosen) {
  const LayerConfig config{.hidden = 4, .ffn = 3, .experts = 4};
  EXPECT_EQ(message_of([&] { MoELayer<TopK<2>, LoadLoss, double> layer(config); }),
            "moekit::MoELayer: LoadLoss reads noisy gating's logits but the router has no noisy gating; expected a "
            "router built with noisy_gating = true (TopK's option)");
  EXPECT_EQ(message_of([&] { MoELayer<TopK<4>, LoadLoss, double> layer(config, TopK<4>{{.noisy_gating = true}}); }),
            "moekit::LoadLoss: K = 4 with 4 experts; expected K < experts (when every expert is chosen the load "
            "has no spread)");
  EXPECT_EQ(message_of([&] { MoELayer<TopK<2>, ImportanceLoss, double> layer(config, ImportanceLoss{{.coefficient = -1}}); }),
            "moekit::ImportanceLoss: coefficient = -1; expected a finite number >= 0 (Shazeer et al.: 0.1)");
}

}  // namespace
}  // namespace moekit::test
