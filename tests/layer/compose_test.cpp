// MoELayer<Ps...>: any order names the same type, missing kinds get their defaults, and the
// layer's parameters and gradients carry the fixture layout's names.
#include <gtest/gtest.h>

#include <moekit/moekit.hpp>

namespace moekit::test {
namespace {

static_assert(std::same_as<MoELayer<TopK<2>, AuxLoss, Dropless, GroupedGemm>,
                           MoELayer<GroupedGemm, Dropless, AuxLoss, TopK<2>>>);
static_assert(std::same_as<MoELayer<double, NoBalance>, MoELayer<NoBalance, double>>);
static_assert(std::same_as<MoELayer<>, BasicMoELayer<float, TopK<2>, AuxLoss, Dropless,
                                                     GroupedGemm, SingleProcess>>);
static_assert(std::same_as<MoELayer<TopK<1>, double>::balancer_type, AuxLoss>);
static_assert(std::same_as<MoELayer<PerExpertLoop>::expert_type, PerExpertLoop>);

TEST(Compose, ParametersAndGradientsHaveTheFixtureNames) {
  MoELayer<TopK<2>, double> layer({.hidden = 32, .ffn = 48, .experts = 8});
  ASSERT_EQ(layer.parameters().size(), 4u);
  ASSERT_EQ(layer.gradients().size(), 4u);
  const std::vector<std::pair<std::string, std::vector<Index>>> expected{
      {"router.weight", {8, 32}}, {"experts.gate", {8, 48, 32}},
      {"experts.up", {8, 48, 32}}, {"experts.down", {8, 32, 48}}};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(layer.parameters()[i].name(), expected[i].first);
    EXPECT_EQ(layer.parameters()[i].shape(), expected[i].second);
    EXPECT_EQ(layer.gradients()[i].name(), expected[i].first);
    EXPECT_EQ(layer.gradients()[i].shape(), expected[i].second);
  }
  EXPECT_EQ(&layer.parameter("experts.up"), &layer.parameters()[2]);
}

TEST(Compose, ConstructorTakesPoliciesInAnyOrder) {
  using Layer = MoELayer<TopK<2>, AuxLoss, GroupedGemm>;
  Layer layer({.hidden = 4, .ffn = 4, .experts = 4}, GroupedGemm{{.row_tile = 7}},
              AuxLoss{{.coefficient = 0.25}}, TopK<2>{{.normalize = false}});
  EXPECT_EQ(layer.expert().options.row_tile, 7);
  EXPECT_EQ(layer.balancer().options.coefficient, 0.25);
  EXPECT_FALSE(layer.router().options.normalize);
}

TEST(Compose, SeedsGiveReproducibleParameters) {
  MoELayer<> a({.hidden = 4, .ffn = 4, .experts = 4, .seed = 3});
  MoELayer<> b({.hidden = 4, .ffn = 4, .experts = 4, .seed = 3});
  MoELayer<> c({.hidden = 4, .ffn = 4, .experts = 4, .seed = 4});
  for (std::size_t p = 0; p < a.parameters().size(); ++p) {
    EXPECT_TRUE(std::ranges::equal(a.parameters()[p].values(), b.parameters()[p].values()));
    EXPECT_FALSE(std::ranges::equal(a.parameters()[p].values(), c.parameters()[p].values()));
  }
}

TEST(Compose, NamesCarryEveryPolicy) {
  EXPECT_EQ((MoELayer<TopK<2>, double>::name()),
            "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f64");
  EXPECT_EQ((MoELayer<TopK<1>, NoBalance, PerExpertLoopType<GeLU>>::name()),
            "TopK1_NoBalance_Dropless_PerExpertLoopGeLU_SingleProcess_f32");
}

}  // namespace
}  // namespace moekit::test
