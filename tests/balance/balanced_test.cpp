// Balanced<Terms...>: the terms' losses and gradients summed, each hook passed to the term that
// has it, each term named in the statistics, its saved state saved and loaded.
#include <gtest/gtest.h>

#include <filesystem>
#include <utility>

#include <moekit/moekit.hpp>

#include "../support/random.hpp"

namespace moekit::test {
namespace {

const LayerConfig config{.hidden = 6, .ffn = 4, .experts = 5, .seed = 2};

template <class Layer>
Layer with_coefficients(double aux, double z) {
  Layer layer(config);
  if constexpr (requires { layer.balancer().template term<AuxLoss>(); }) {
    layer.balancer().template term<AuxLoss>().options.coefficient = aux;
    layer.balancer().template term<ZLoss>().options.coefficient = z;
  } else if constexpr (std::same_as<typename Layer::balancer_type, AuxLoss>) {
    layer.balancer().options.coefficient = aux;
  } else {
    layer.balancer().options.coefficient = z;
  }
  return layer;
}

// AuxLoss + ZLoss (as Switch and ST-MoE train): the loss and every gradient are the sums of the
// layers with each term alone, from the same parameters and input.
TEST(Balanced, LossAndGradientsAreTheTermsSums) {
  using Both = MoELayer<TopK<2>, Balanced<AuxLoss, ZLoss>, double>;
  auto both = with_coefficients<Both>(0.3, 0.2);
  auto aux = with_coefficients<MoELayer<TopK<2>, AuxLoss, double>>(0.3, 0.2);
  auto z = with_coefficients<MoELayer<TopK<2>, ZLoss, double>>(0.3, 0.2);
  const Matrix<double> x = random_matrix(17, 6, 1), dy = Matrix<double>::Zero(17, 6);  // the balancers' gradients alone
  both.forward(x);
  aux.forward(x);
  z.forward(x);
  EXPECT_NEAR(both.balance_loss(), aux.balance_loss() + z.balance_loss(), 1e-15);
  const auto terms = both.stats().balance_terms;
  ASSERT_EQ(terms.size(), 2u);
  EXPECT_EQ(terms[0].first, "AuxLoss");
  EXPECT_EQ(terms[0].second, aux.balance_loss());
  EXPECT_EQ(terms[1].first, "ZLoss");
  EXPECT_EQ(terms[1].second, z.balance_loss());
  const Matrix<double> dx = both.backward(dy), dx_sum = aux.backward(dy) + z.backward(dy);
  EXPECT_LT((dx - dx_sum).norm(), 1e-14 * dx.norm());
  const auto& g = both.gradient("router.weight").matrix();
  EXPECT_LT((g - aux.gradient("router.weight").matrix() - z.gradient("router.weight").matrix()).norm(), 1e-14 * g.norm());
  EXPECT_GT(g.norm(), 0.0);
}

// AuxFree + AuxLoss (DeepSeek-V3's bias with a small loss beside it): AuxFree selects, counts and
// steps as it does alone, and its bias saves and loads under its own name.
TEST(Balanced, AuxFreeBesideALossSelectsStepsAndSavesAsAlone) {
  using Both = MoELayer<TopK<2>, Balanced<AuxFree, AuxLoss>>;
  using Alone = MoELayer<TopK<2>, AuxFree>;
  Both both(config);
  Alone alone(config);
  const Matrix<float> x = random_matrix<float>(40, 6, 3);
  for (int step = 0; step < 3; ++step) {
    EXPECT_EQ(Matrix<float>(both.forward(x)), Matrix<float>(alone.forward(x))) << "step " << step;
    EXPECT_EQ(both.routing().index, alone.routing().index);
    both.end_step();
    alone.end_step();
  }
  const auto& bias = std::get<0>(both.balance_state().terms).bias;
  EXPECT_EQ(bias, alone.balance_state().bias);
  const auto path = std::filesystem::temp_directory_path() / "moekit_balanced_test.safetensors";
  both.save(path);
  EXPECT_TRUE(io::SafeTensors::read(path).contains("router.bias"));
  Both loaded(config);
  loaded.load(path);
  EXPECT_EQ(std::get<0>(loaded.balance_state().terms).bias, bias);
  std::filesystem::remove(path);
  EXPECT_EQ(Both::name(), "TopK2_AuxFreePlusAuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f32");
}

TEST(Balanced, ValidatesEachTerm) {
  MoELayer<TopK<2>, Balanced<AuxLoss, ZLoss>> layer(config);
  layer.balancer().term<ZLoss>().options.coefficient = -1;
  EXPECT_THROW(layer.forward(random_matrix<float>(3, 6, 4)), error);
}

}  // namespace
}  // namespace moekit::test
