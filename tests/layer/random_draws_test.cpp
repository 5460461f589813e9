// The layer's random draws: the router's input jitter (TopK's jitter), GShard's random second
// expert (TopK's random_second) and noisy gating's noise (TopK's noisy_gating). Drawn in training
// only, the same within a step and new at the next, the same bits on any thread count; the jitter
// refused out of range; noisy gating's parameter. Their formulas and gradients run in the typed
// layer matrix (tests/layer/combo_test.hpp), the draws' statistics in tests/core/random_test.cpp
// and tests/router/random_second_test.cpp, over ranks in tests/mpi/.
#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <cmath>
#include <cstring>
#include <utility>
#include <string>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

using Layer = MoELayer<Switch, AuxLoss>;
const LayerConfig config{.hidden = 8, .ffn = 6, .experts = 4, .seed = 3};
const Switch jittered{{.jitter = 0.2, .seed = 9}};

std::vector<float> routing_weights(const Layer& layer) { return layer.routing().weight; }

TEST(Jitter, DrawsInTrainingOnlyTheSameWithinAStepAndNewAtTheNext) {
  const Matrix<float> x = random_matrix<float>(64, 8, 1);
  Layer plain(config), layer(config, jittered);
  plain.forward(x);
  layer.forward(x);
  const auto first = routing_weights(layer);
  EXPECT_NE(first, routing_weights(plain)) << "the jitter moved no weight";

  layer.forward(x);
  EXPECT_EQ(routing_weights(layer), first) << "a step's forwards draw the same numbers";

  layer.end_step();
  EXPECT_EQ(layer.step(), 1u);
  layer.forward(x);
  EXPECT_NE(routing_weights(layer), first) << "the next step draws anew";

  layer.set_step(0);
  layer.forward(x);
  EXPECT_EQ(routing_weights(layer), first) << "set_step replays a step";

  layer.eval();
  EXPECT_EQ(Matrix<float>(layer.forward(x)), Matrix<float>(plain.forward(x))) << "no jitter at evaluation";
  EXPECT_EQ(routing_weights(layer), routing_weights(plain));
}

// 600 tokens: three of the router's blocks of 256, jittered and drawn on different threads.
TEST(RandomDraws, OneThreadAndManyGiveTheSameBits) {
  const Matrix<float> x = random_matrix<float>(600, 8, 2), dy = random_matrix<float>(600, 8, 3);
  auto run = [&](std::size_t threads) {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
    MoELayer<TopK<2>, AuxLoss> layer(config,
                                     TopK<2>{{.jitter = 0.2, .random_second = 0.5, .noisy_gating = true, .seed = 9}});
    layer.parameter("router.noise_weight").matrix() = random_matrix<float>(4, 8, 4);
    const Matrix<float> y = layer.forward(x);
    const Matrix<float> dx = layer.backward(dy);
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    for (const auto& g : layer.gradients()) all.insert(all.end(), g.values().begin(), g.values().end());
    return all;
  };
  const auto one = run(1), many = run(8);
  ASSERT_EQ(one.size(), many.size());
  EXPECT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(float)));
}

// The seed is the policy's: two seeds, two draws; the parameters' seed plays no part in them.
TEST(Jitter, TheRoutersSeedChoosesTheDraws) {
  const Matrix<float> x = random_matrix<float>(64, 8, 4);
  Layer a(config, jittered), b(config, Switch{{.jitter = 0.2, .seed = 10}});
  a.forward(x);
  b.forward(x);
  EXPECT_NE(routing_weights(a), routing_weights(b));
}

// A second choice left empty gets no row and is not a drop; evaluation leaves none empty.
TEST(RandomSecondExpert, EmptyChoicesGetNoRowAndAreNotDrops) {
  using Top2 = MoELayer<TopK<2>, AuxLoss>;
  Top2 layer(config, TopK<2>{{.random_second = 0.4, .seed = 2}});
  const Matrix<float> x = random_matrix<float>(200, 8, 5);
  layer.forward(x);
  Index empty = 0, placed = 0;
  for (std::size_t c = 0; c < layer.routing().index.size(); ++c) {
    const bool is_empty = Routing<float>::is_empty(layer.routing().index[c]);
    empty += is_empty;
    EXPECT_EQ(layer.plan().slot[c] == Plan::no_slot, is_empty) << "choice " << c;
  }
  for (const Index n : layer.tokens_per_expert()) placed += n;
  EXPECT_GT(empty, 0);
  EXPECT_EQ(placed + empty, 2 * x.rows());
  EXPECT_EQ(layer.plan().rows(), placed);
  EXPECT_EQ(layer.stats().dropped, 0);

  layer.eval();
  layer.forward(x);
  for (const Index i : layer.routing().index) EXPECT_FALSE(Routing<float>::is_empty(i));
}

using Top2 = MoELayer<TopK<2>, AuxLoss>;
const TopK<2> noisy{{.noisy_gating = true, .seed = 6}};

// router.noise_weight follows the router's weight, starts at 0 and takes no draws: the other
// parameters start as they would without noisy gating.
TEST(NoisyGating, NoiseWeightIsAParameterThatStartsAtZero) {
  Top2 plain(config), layer(config, noisy);
  ASSERT_EQ(layer.parameters().size(), plain.parameters().size() + 1);
  EXPECT_EQ(layer.parameters()[1].name(), "router.noise_weight");
  EXPECT_EQ(layer.parameters()[1].shape(), (std::vector<Index>{4, 8}));
  for (const float v : layer.parameters()[1].values()) ASSERT_EQ(v, 0.0f);
  for (std::size_t p = 0; p < plain.parameters().size(); ++p) {
    const auto& other = layer.parameters()[p < 1 ? p : p + 1];
    EXPECT_EQ(plain.parameters()[p].name(), other.name());
    EXPECT_TRUE(std::equal(other.values().begin(), other.values().end(), plain.parameters()[p].values().begin()))
        << other.name();
  }
  EXPECT_THROW(plain.parameter("router.noise_weight"), error);
}

// In training the noise moves the routing, the same within a step and anew at the next; at
// evaluation the layer is the plain one; with the noise weight far negative (softplus ≈ 0) the
// training forward is the plain one too.
TEST(NoisyGating, NoiseInTrainingOnlyTheSameWithinAStepAndNewAtTheNext) {
  const Matrix<float> x = random_matrix<float>(64, 8, 6);
  Top2 plain(config), layer(config, noisy);
  const Matrix<float> y_plain = plain.forward(x);
  layer.forward(x);
  const auto first = layer.routing().weight;
  EXPECT_NE(first, plain.routing().weight) << "the noise moved no weight";
  layer.forward(x);
  EXPECT_EQ(layer.routing().weight, first) << "a step's forwards draw the same numbers";
  layer.end_step();
  layer.forward(x);
  EXPECT_NE(layer.routing().weight, first) << "the next step draws anew";
  layer.set_step(0);
  layer.forward(x);
  EXPECT_EQ(layer.routing().weight, first) << "set_step replays a step";

  layer.eval();
  EXPECT_EQ(Matrix<float>(layer.forward(x)), y_plain) << "no noise at evaluation";
  layer.train();
  layer.parameter("router.noise_weight").matrix().setConstant(0);
  layer.parameter("router.noise_weight").matrix().col(0).setConstant(-1000);  // x·W_nᵀ <= −1000 where x₀ >= 1
  Matrix<float> x_positive = x;
  x_positive.col(0) = x.col(0).cwiseAbs().array() + 1.0f;
  EXPECT_LT((layer.forward(x_positive) - plain.forward(x_positive)).norm(), 1e-5f) << "softplus(−∞) adds no noise";
}

// The option fixes the parameter at construction: turning it on or off later is refused.
TEST(NoisyGating, TheOptionCannotChangeAfterConstruction) {
  Top2 layer(config, noisy);
  layer.router().options.noisy_gating = false;
  EXPECT_EQ(message_of([&] { layer.forward(random_matrix<float>(3, 8, 7)); }),
            "moekit::MoELayer: the router's noisy_gating is now false; expected true as when the layer was built "
            "(router.noise_weight is a parameter only if it was)");
}

TEST(Jitter, OutOfRangeIsRefusedByName) {
  for (const auto& [jitter, shown] : {std::pair{-0.1, "-0.1"}, std::pair{1.0, "1"}, std::pair{std::nan(""), "nan"}})
    EXPECT_EQ(message_of([&] { Layer layer(config, Switch{{.jitter = jitter}}); }),
              std::string("moekit::TopK: jitter = ") + shown + "; expected 0 <= jitter < 1 (Switch: 1e-2)");
}

}  // namespace
}  // namespace moekit::test
