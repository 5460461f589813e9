// AuxFree: the sign update by hand; the bias steers selection but never the weights or the
// gradients; it is saved and loaded as router.bias; and on skewed input it evens the load.
#include <gtest/gtest.h>

#include <filesystem>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

using Layer = MoELayer<TopK<2>, AuxFree, double>;
const TopK<2> deepseek_style{{.score = ScoreFn::sigmoid, .normalize = true}};

TEST(AuxFree, SignUpdateByHand) {
  const AuxFree policy{{.rate = 0.1}};
  AuxFree::State<double> state;
  const std::vector<Index> load{5, 1, 2, 0};  // mean 2
  policy.routed<double>(load, state);
  policy.step<double>({}, state);
  EXPECT_EQ(state.bias, (std::vector<double>{-0.1, 0.1, 0.0, 0.1}));
  EXPECT_EQ(state.counts, (std::vector<Index>{0, 0, 0, 0}));
  EXPECT_THROW(AuxFree{{.rate = -1}}.validate({}), error);
}

TEST(AuxFree, BiasSteersSelectionButNotTheWeights) {
  const auto path = std::filesystem::temp_directory_path() / "moekit_aux_free.safetensors";
  Layer layer({.hidden = 6, .ffn = 5, .experts = 4, .seed = 2}, deepseek_style);
  io::SafeTensors file;
  for (const auto& p : layer.parameters()) file.add(p.name(), p.shape(), p.values());
  file.add<double>("router.bias", {4}, std::vector<double>{0, 0, 0, 10});
  file.write(path);
  layer.load(path);
  ASSERT_EQ(layer.balance_state().bias[3], 10.0);

  const auto x = random_matrix(7, 6, 3);
  layer.forward(x);
  for (Index t = 0; t < 7; ++t) {
    const auto& r = layer.routing();
    EXPECT_EQ(r.index[static_cast<std::size_t>(2 * t)], 3);  // the bias wins selection
    const Index other = r.index[static_cast<std::size_t>(2 * t + 1)];
    // ... but the weight is the unbiased score, renormalised (1 / (1 + e^-l) from the logits).
    const double s3 = 1 / (1 + std::exp(-(x.row(t) * layer.parameter("router.weight").matrix().row(3).transpose())(0)));
    const double so = 1 / (1 + std::exp(-(x.row(t) * layer.parameter("router.weight").matrix().row(other).transpose())(0)));
    EXPECT_NEAR(r.weight[static_cast<std::size_t>(2 * t)], s3 / (s3 + so), 1e-14);
  }

  // The bias is constant to backward: gradients still match finite differences.
  for (const auto& report : check_gradients(layer, x, random_matrix(7, 6, 4)))
    EXPECT_LT(report.error, 1e-6) << report.name;
  for (const auto& p : layer.parameters()) EXPECT_NE(p.name(), "router.bias");  // not a parameter

  layer.save(path);
  EXPECT_EQ(io::SafeTensors::read(path).values<double>("router.bias"), layer.balance_state().bias);
  std::filesystem::remove(path);
}

// The layer saves and loads a balancer's state through the SavesState hook, under the name the
// balancer gives: here AuxFree's bias under another name, and no "router.bias".
struct RenamedAuxFree : AuxFree {
  static constexpr std::string_view name = "RenamedAuxFree";
  static constexpr std::string_view saved_name = "balance.renamed_bias";
};

TEST(AuxFree, TheLayerSavesABalancersStateUnderTheNameItGives) {
  static_assert(SavesState<AuxFree, float> && SavesState<RenamedAuxFree, double>);
  static_assert(!SavesState<AuxLoss, double> && !SavesState<NoBalance, double>);
  using Renamed = MoELayer<TopK<2>, RenamedAuxFree, double>;
  const auto path = std::filesystem::temp_directory_path() / "moekit_renamed_aux_free.safetensors";
  Renamed layer({.hidden = 6, .ffn = 5, .experts = 4, .seed = 2});
  layer.forward(random_matrix(16, 6, 5));
  layer.end_step();  // the bias moves off zero
  ASSERT_NE(layer.balance_state().bias, std::vector<double>(4, 0.0));
  layer.save(path);
  const auto file = io::SafeTensors::read(path);
  EXPECT_FALSE(file.contains("router.bias"));
  EXPECT_EQ(file.values<double>("balance.renamed_bias"), layer.balance_state().bias);

  Renamed loaded({.hidden = 6, .ffn = 5, .experts = 4, .seed = 9});
  loaded.load(path);
  EXPECT_EQ(loaded.balance_state().bias, layer.balance_state().bias);
  EXPECT_EQ(loaded.balance_state().counts, std::vector<Index>(4, 0));
  std::filesystem::remove(path);
}

TEST(AuxFree, EvensASkewedLoadOverSteps) {
  Layer layer({.hidden = 8, .ffn = 4, .experts = 4, .seed = 5}, deepseek_style, AuxFree{{.rate = 0.01}});
  layer.parameter("router.weight").matrix().row(0).setConstant(0.4);  // expert 0 scores high on every token
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    layer.forward(random_matrix(64, 8, 100 + static_cast<unsigned>(step), 1.0, 1.0));
    (step == 0 ? first : last) = layer.stats().max_over_mean;
    layer.end_step();
  }
  EXPECT_GT(first, 1.8);  // skewed at the start
  EXPECT_LT(last, 1.3);   // nearly even after the bias has moved
  EXPECT_LT(layer.balance_state().bias[0], 0.0);
}

}  // namespace
}  // namespace moekit::test
