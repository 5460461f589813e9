// Upcycling (moekit::upcycle): a layer built from a dense FFN computes that FFN where the method
// says it does — a normalising router with whole copies chosen, exactly for g = 1 and for ReLU —
// and otherwise holds the shards, the scale and the router rows Megatron-Core's upcycling gives.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <utility>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/random.hpp"
#include "../support/tolerance.hpp"

namespace moekit::test {
namespace {

constexpr Index hidden = 12, dense_ffn = 24;

template <class T>
DenseFfn<T> random_ffn(bool gated, unsigned seed) {
  return {gated ? random_matrix<T>(dense_ffn, hidden, seed, 0.3) : Matrix<T>(),
          random_matrix<T>(dense_ffn, hidden, seed + 1, 0.3), random_matrix<T>(hidden, dense_ffn, seed + 2, 0.3)};
}

/// The dense FFN on x's rows: down · (silu(gate · x) ⊙ up · x), or down · relu(up · x).
template <class T>
Matrix<T> dense_forward(const DenseFfn<T>& f, const Matrix<T>& x) {
  const Matrix<T> up = x * f.up.transpose();
  if (f.gate.size() == 0) return up.cwiseMax(T(0)) * f.down.transpose();
  const Matrix<T> gate = x * f.gate.transpose();
  const Matrix<T> hidden_rows = (gate.array() / (T(1) + (-gate.array()).exp()) * up.array()).matrix();
  return hidden_rows * f.down.transpose();
}

double relative(const auto& got, const auto& want) { return (got - want).norm() / want.norm(); }

// Sparse upcycling (g = 1): every expert the dense FFN; any normalising router then computes it,
// a top-k scale included (down is divided by it).
TEST(Upcycle, EveryExpertACopyComputesTheDenseFfn) {
  using Layer = MoELayer<TopK<2>, NoBalance, double>;
  const auto ffn = random_ffn<double>(true, 1);
  const Matrix<double> x = random_matrix<double>(9, hidden, 4);
  for (const TopK<2>::Options& options :
       {TopK<2>::Options{ScoreFn::softmax, true, 1.0}, TopK<2>::Options{ScoreFn::sigmoid, true, 2.5}}) {
    Layer layer({.hidden = hidden, .ffn = dense_ffn, .experts = 4, .seed = 2}, TopK<2>{options});
    upcycle(layer, ffn);
    EXPECT_LT(relative(layer.forward(x), dense_forward(ffn, x)), 1e-13) << "scale " << options.scale;
  }
}

// Granular upcycling with ReLU (which scales with its input): g = 4 shards of each of 2 copies,
// K = 4, so a token takes the four shards of one copy, each weighted 1/4, and the scale √4
// makes up for it on each side of the activation.
TEST(Upcycle, ShardsOfOneCopyComputeTheDenseFfnWithRelu) {
  using Layer = MoELayer<TopK<4>, NoBalance, GroupedGemmType<ReLU>, double>;
  const auto ffn = random_ffn<double>(false, 5);
  Layer layer({.hidden = hidden, .ffn = dense_ffn / 4, .experts = 8, .seed = 3});
  upcycle(layer, ffn, {.granularity = 4});
  const Matrix<double> x = random_matrix<double>(16, hidden, 6);
  EXPECT_LT(relative(layer.forward(x), dense_forward(ffn, x)), 1e-13);
  std::set<Index> copies_chosen;
  for (Index t = 0; t < x.rows(); ++t) {
    std::set<Index> chosen;
    for (int k = 0; k < 4; ++k) chosen.insert(layer.routing().index[static_cast<std::size_t>(t * 4 + k)]);
    const Index copy = *chosen.begin() / 4;
    EXPECT_EQ(chosen, (std::set<Index>{4 * copy, 4 * copy + 1, 4 * copy + 2, 4 * copy + 3})) << "token " << t;
    copies_chosen.insert(copy);
  }
  EXPECT_EQ(copies_chosen.size(), 2u) << "both copies' router rows are in use";
}

// With SwiGLU the shards are not the FFN (silu does not scale with its input): the layer holds
// Megatron-Core's experts — shard j mod g of copy j / g, times ∛g — and router rows tied by copy.
TEST(Upcycle, GranularUpcyclingHoldsScaledShardsAndTiedRouterRows) {
  using Layer = MoELayer<TopK<2>, NoBalance, double>;
  const auto ffn = random_ffn<double>(true, 7);
  Layer layer({.hidden = hidden, .ffn = dense_ffn / 2, .experts = 6, .seed = 4});
  const Matrix<double> router_before = std::as_const(layer).parameter("router.weight").matrix();
  upcycle(layer, ffn, {.granularity = 2});
  const double s = std::cbrt(2.0);
  const auto& gate = std::as_const(layer).parameter("experts.gate");
  const auto& up = std::as_const(layer).parameter("experts.up");
  const auto& down = std::as_const(layer).parameter("experts.down");
  const auto router = std::as_const(layer).parameter("router.weight").matrix();
  for (Index j = 0; j < 6; ++j) {
    const Index first = (j % 2) * (dense_ffn / 2);
    EXPECT_LT(relative(gate.slice(j), s * ffn.gate.middleRows(first, dense_ffn / 2)), 1e-15) << j;
    EXPECT_LT(relative(up.slice(j), s * ffn.up.middleRows(first, dense_ffn / 2)), 1e-15) << j;
    EXPECT_LT(relative(down.slice(j), s * ffn.down.middleCols(first, dense_ffn / 2)), 1e-15) << j;
    EXPECT_EQ(router.row(j), router_before.row(j / 2)) << "the router's first E/g rows, each g times";
  }
  const Matrix<double> x = random_matrix<double>(10, hidden, 8);
  layer.forward(x);
  for (Index t = 0; t < x.rows(); ++t)
    EXPECT_EQ(layer.routing().index[static_cast<std::size_t>(2 * t)] / 2,
              layer.routing().index[static_cast<std::size_t>(2 * t + 1)] / 2)
        << "one copy's two shards";
}

// A router that does not normalise (Switch's top-1): A = (E / g) · g² / k, here 4 experts, k = 1:
// the weights times ∛4 for SwiGLU.
TEST(Upcycle, WithoutNormalisationTheWeightsScaleAsMegatronCoreSays) {
  using Layer = MoELayer<TopK<1>, NoBalance, double>;
  const auto ffn = random_ffn<double>(true, 9);
  Layer layer({.hidden = hidden, .ffn = dense_ffn, .experts = 4, .seed = 5});
  upcycle(layer, ffn);
  for (Index j = 0; j < 4; ++j)
    EXPECT_LT(relative(std::as_const(layer).parameter("experts.up").slice(j), std::cbrt(4.0) * ffn.up), 1e-15);
  EXPECT_DOUBLE_EQ(upcycle_weight_scale(false, false, 64, 8, 8), std::sqrt(8.0 * 64.0 / 8.0));
}

// Any precision takes the weights as any other way of setting them: an int8 layer quantises them.
TEST(Upcycle, AnInt8LayerIsUpcycledToo) {
  using Layer = MoELayer<TopK<2>, int8>;
  const auto ffn = random_ffn<float>(true, 11);
  Layer layer({.hidden = hidden, .ffn = dense_ffn, .experts = 4, .seed = 6});
  upcycle(layer, ffn);
  const Matrix<float> x = random_matrix<float>(9, hidden, 12);
  const double error = relative(layer.forward(x), dense_forward(ffn, x));
  EXPECT_LT(error, int8_bound);
  EXPECT_GT(error, 1e-5) << "quantised";
}

TEST(Upcycle, BadShapesAreNamed) {
  MoELayer<TopK<2>, NoBalance, double> swiglu({.hidden = hidden, .ffn = dense_ffn / 2, .experts = 6});
  EXPECT_EQ(message_of([&] { upcycle(swiglu, random_ffn<double>(true, 1)); }),
            "moekit::upcycle: up is [24,12]; expected [12,12] (granularity 1 × the layer's ffn 12, its hidden)");
  EXPECT_EQ(message_of([&] { upcycle(swiglu, random_ffn<double>(true, 1), {.granularity = 4}); }),
            "moekit::upcycle: granularity = 4 with 6 experts; expected a divisor of the experts");
  EXPECT_EQ(message_of([&] { upcycle(swiglu, random_ffn<double>(false, 1), {.granularity = 2}); }),
            "moekit::upcycle: gate is [0,0]; expected [24,12] for SwiGLU");
  MoELayer<TopK<2>, NoBalance, GroupedGemmType<ReLU>, double> relu({.hidden = hidden, .ffn = dense_ffn, .experts = 2});
  EXPECT_EQ(message_of([&] { upcycle(relu, random_ffn<double>(true, 1)); }),
            "moekit::upcycle: a gate [24,12] for ReLU, which has none; expected an empty gate");
}

}  // namespace
}  // namespace moekit::test
