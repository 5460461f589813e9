// The layer with capacity limits: dropped pairs get no compute and no gradient, gradients stay
// right with drops happening, and a capacity that drops nothing equals Dropless.
#include <gtest/gtest.h>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

using Layer = MoELayer<TopK<2>, AuxLoss, Capacity, double>;
constexpr LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .seed = 3};

TEST(CapacityLayer, GradientsAreRightWithDropsHappening) {
  for (auto drop : {DropPolicy::weight, DropPolicy::position})
    for (bool pad : {false, true}) {
      Layer layer(config, Capacity{{.capacity_factor = 0.5, .drop = drop, .pad = pad}}, AuxLoss{{.coefficient = 0.5}});
      const auto x = random_matrix(9, 6, 1), dy = random_matrix(9, 6, 2);
      layer.forward(x);
      ASSERT_GT(layer.plan().dropped, 0);
      for (const auto& report : check_gradients(layer, x, dy))
        EXPECT_LT(report.error, 1e-6) << report.name << " pad " << pad;
    }
}

TEST(CapacityLayer, ATokenDroppedByAllItsExpertsGetsZero) {
  // Capacity 1 per expert: 4 experts, 8 tokens with 2 choices each, so most pairs are dropped.
  Layer layer(config, Capacity{{.capacity_factor = 0.25}});
  const auto x = random_matrix(8, 6, 4);
  const Matrix<double> y = layer.forward(x);
  const auto& plan = layer.plan();
  int fully_dropped = 0;
  for (Index t = 0; t < 8; ++t)
    if (plan.slot[static_cast<std::size_t>(2 * t)] == Plan::no_slot && plan.slot[static_cast<std::size_t>(2 * t + 1)] == Plan::no_slot) {
      ++fully_dropped;
      EXPECT_TRUE(y.row(t).isZero(0));
    }
  EXPECT_GT(fully_dropped, 0);
}

TEST(CapacityLayer, RenormalisedWeightsSumToOneAndGradientsStayRight) {
  for (bool normalize : {false, true}) {
    Layer layer(config, TopK<2>{{.normalize = normalize}},
                Capacity{{.capacity_factor = 0.5, .renormalize = true}}, AuxLoss{{.coefficient = 0.5}});
    const auto x = random_matrix(9, 6, 7), dy = random_matrix(9, 6, 8);
    layer.forward(x);
    ASSERT_GT(layer.plan().dropped, 0);
    for (Index t = 0; t < 9; ++t) {
      const auto& w = layer.routing().weight;
      const auto& slot = layer.plan().slot;
      const auto c = static_cast<std::size_t>(2 * t);
      const int kept = (slot[c] != Plan::no_slot) + (slot[c + 1] != Plan::no_slot);
      EXPECT_NEAR(w[c] + w[c + 1], kept ? 1.0 : 0.0, 1e-15);  // DeepSpeed: kept weights renormalised
      if (slot[c] == Plan::no_slot) {
        EXPECT_EQ(w[c], 0.0);
      }
    }
    for (const auto& report : check_gradients(layer, x, dy))
      EXPECT_LT(report.error, 1e-6) << report.name << " normalize " << normalize;
  }
  EXPECT_THROW((MoELayer<TopK<1>, Capacity>({.hidden = 4, .ffn = 4, .experts = 4},
                                            Capacity{{.renormalize = true}})),
               error);
}

TEST(CapacityLayer, DroppingNothingEqualsDropless) {
  using Free = MoELayer<TopK<2>, AuxLoss, Dropless, double>;
  Layer capped(config, Capacity{{.capacity_factor = 4.0}});
  Free free(config);
  const auto x = random_matrix(11, 6, 5), dy = random_matrix(11, 6, 6);
  EXPECT_EQ(capped.forward(x), free.forward(x));
  EXPECT_EQ(capped.backward(dy), free.backward(dy));
  for (std::size_t p = 0; p < capped.gradients().size(); ++p)
    EXPECT_TRUE(std::ranges::equal(capped.gradients()[p].values(), free.gradients()[p].values()));
  EXPECT_EQ(capped.plan().dropped, 0);
}

}  // namespace
}  // namespace moekit::test
