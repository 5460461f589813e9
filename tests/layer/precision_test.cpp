// bf16 products against float, on a layer of a size where roundings average as in a model's: the
// output, the input's gradient and every parameter's gradient within 3 u (u = 2^-8, bf16's unit
// roundoff) of the float layer's, norm-wise, and each visibly rounded. Each passes through at most
// three products, each off by about 0.6 u relative, root mean square, for operands of random sign
// (tests/support/tolerance.hpp); the router and the balancing stay float. Both layers start from
// the same parameters and see the same batch; the routing is compared too, since a product's
// rounding must not move a token to another expert where the router computes in float.
#include <gtest/gtest.h>

#include <moekit/moekit.hpp>

#include "../support/random.hpp"
#include "../support/tolerance.hpp"

namespace moekit {
namespace {

template <class Float, class Bf16>
void expect_within_rounding(const LayerConfig& config, Index tokens) {
  Float exact(config);
  Bf16 rounded(config);
  for (std::size_t p = 0; p < exact.parameters().size(); ++p)
    std::ranges::copy(exact.parameters()[p].values(), rounded.parameters()[p].values().begin());
  const Matrix<float> x = test::random_matrix<float>(tokens, config.hidden, 1);
  const Matrix<float> dy = test::random_matrix<float>(tokens, config.hidden, 2);
  const Matrix<float> y_exact = exact.forward(x), y = rounded.forward(x);
  EXPECT_EQ(exact.routing().index, rounded.routing().index);
  const Matrix<float> dx_exact = exact.backward(dy), dx = rounded.backward(dy);
  const double u = test::bf16_unit;
  const auto expect_close = [&](auto got, auto want, const std::string& what) {
    const double error = (got - want).norm() / want.norm();
    EXPECT_LT(error, 3 * u) << what;
    EXPECT_GT(error, 0.1 * u) << what << ": no rounding seen";
    ::testing::Test::RecordProperty(what, std::to_string(error / u) + " u");
  };
  expect_close(y, y_exact, "y");
  expect_close(dx, dx_exact, "dx");
  for (std::size_t p = 0; p < exact.gradients().size(); ++p)
    expect_close(rounded.gradients()[p].matrix(), exact.gradients()[p].matrix(), exact.gradients()[p].name());
}

TEST(Bf16Layer, WithinRoundingOfTheFloatLayer) {
  expect_within_rounding<MoELayer<TopK<2>>, MoELayer<TopK<2>, bf16>>(
      {.hidden = 256, .ffn = 384, .experts = 8, .seed = 3}, 256);
}

TEST(Bf16Layer, SharedExpertRoundsToo) {  // DeepSeek's shape of layer: routed and shared experts in bf16
  using Exact = MoELayer<TopK<2>, NoBalance, Shared<>>;
  using Rounded = MoELayer<TopK<2>, NoBalance, Shared<>, bf16>;
  static_assert(Rounded::shared_expert_type::expert_type::precision == Precision::bf16);
  expect_within_rounding<Exact, Rounded>({.hidden = 256, .ffn = 192, .experts = 8, .shared_ffn = 384, .seed = 4}, 256);
}

TEST(Bf16Layer, NamedByItsPrecision) {
  EXPECT_EQ((MoELayer<TopK<2>, bf16>::name()), "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_bf16");
  EXPECT_TRUE((std::same_as<MoELayer<bf16, TopK<2>, float>, MoELayer<TopK<2>, bf16>>)) << "any order, one type";
}

}  // namespace
}  // namespace moekit
