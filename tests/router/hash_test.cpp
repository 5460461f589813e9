// Hash routing (Roller et al. 2021): each token's one expert is a fixed function of its id, from
// a random hash or a table (the balanced assignment), and the layer that takes the ids.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

Routing<double> route(const Hash& router, const std::vector<Index>& ids, Index experts) {
  Routing<double> routing;
  router.select(RouterContext{.token_ids = ids}, experts, routing);
  return routing;
}

std::vector<Index> ids_up_to(Index n) {
  std::vector<Index> ids(static_cast<std::size_t>(n));
  std::iota(ids.begin(), ids.end(), Index{0});
  return ids;
}

// The random hash gives each expert 1/E of the ids: a χ² of the counts over 64 000 consecutive
// ids stays within 6 standard deviations of its mean E − 1, at E = 3, 8 and 64; and each id goes
// to one expert with weight 1.
TEST(Hash, RandomHashSpreadsIdsEvenly) {
  const Index n = 64000;
  for (const Index experts : {3, 8, 64}) {
    const Routing<double> routing = route(Hash{{.seed = 5}}, ids_up_to(n), experts);
    ASSERT_EQ(routing.tokens, n);
    ASSERT_EQ(routing.top_k, 1);
    std::vector<double> count(static_cast<std::size_t>(experts), 0.0);
    for (std::size_t t = 0; t < routing.index.size(); ++t) {
      ASSERT_GE(routing.index[t], 0);
      ASSERT_LT(routing.index[t], experts);
      ASSERT_EQ(routing.weight[t], 1.0);
      count[static_cast<std::size_t>(routing.index[t])] += 1;
    }
    const double expected = double(n) / double(experts);
    double chi2 = 0;
    for (double c : count) chi2 += (c - expected) * (c - expected) / expected;
    const double dof = double(experts - 1);
    EXPECT_LT(std::abs(chi2 - dof), 6 * std::sqrt(2 * dof)) << experts << " experts";
  }
}

// The hash is fixed: the same id gives the same expert wherever it occurs and on any call; another
// seed is another hash (about 1 − 1/E of the ids move).
TEST(Hash, SameIdSameExpertAndTheSeedPicksTheHash) {
  const Index experts = 8;
  const std::vector<Index> ids = ids_up_to(10000);
  std::vector<Index> reversed(ids.rbegin(), ids.rend());
  const Routing<double> forward = route(Hash{{.seed = 1}}, ids, experts);
  const Routing<double> backward = route(Hash{{.seed = 1}}, reversed, experts);
  for (std::size_t t = 0; t < ids.size(); ++t) ASSERT_EQ(forward.index[t], backward.index[ids.size() - 1 - t]);
  const Routing<double> other = route(Hash{{.seed = 2}}, ids, experts);
  Index moved = 0;
  for (std::size_t t = 0; t < ids.size(); ++t) moved += forward.index[t] != other.index[t];
  EXPECT_NEAR(double(moved) / double(ids.size()), 1 - 1.0 / double(experts), 0.02);
}

// A table maps each id to its entry; the router refuses an entry that names no expert, and ids it
// cannot map (negative, or beyond the table), naming the token.
TEST(Hash, TableMapsIdsAndRefusesWhatItCannotMap) {
  const Hash router{{.table = {2, 0, 1, 1}}};
  const Routing<double> routing = route(router, {3, 0, 2, 1, 0}, 3);
  EXPECT_EQ(routing.index, (std::vector<Index>{1, 2, 1, 0, 2}));
  EXPECT_EQ(message_of([&] { router.validate({.hidden = 4, .ffn = 4, .experts = 2, .top_k = 1}); }),
            "moekit::Hash: table[0] = 2 but the layer has 2 experts; expected 0 <= expert < 2");
  EXPECT_EQ(message_of([&] { router.check_token_ids(std::vector<Index>{0, 4}); }),
            "moekit::Hash: token 1 has id 4; expected 0 <= id < the table's size, 4");
  EXPECT_EQ(message_of([&] { Hash{}.check_token_ids(std::vector<Index>{7, -1}); }),
            "moekit::Hash: token 1 has id -1; expected an id >= 0");
}

// The balanced assignment by hand: ids by count (5, 4, 3, 3, 1), each to the emptiest expert.
TEST(Hash, BalancedTableByHand) {
  const std::vector<double> counts{3, 5, 1, 4, 3};
  // id 1 (5) → 0; id 3 (4) → 1; id 0 (3) → 1 (4 < 5); id 4 (3) → 0 (5 < 7); id 2 (1) → 1 (7 < 8).
  EXPECT_EQ(Hash::balanced_table(counts, 2), (std::vector<Index>{1, 0, 1, 1, 0}));
  EXPECT_EQ(message_of([&] { Hash::balanced_table(std::vector<double>{1, -2}, 2); }),
            "moekit::Hash::balanced_table: counts[1] = -2; expected a finite count >= 0");
  EXPECT_EQ(message_of([&] { Hash::balanced_table(counts, 0); }),
            "moekit::Hash::balanced_table: experts = 0; expected at least 1");
}

// On Zipf counts (id i seen ∝ 1/(i + 1)), the balanced table's busiest expert carries at most the
// mean load plus the largest count (the greedy rule's bound), far more even than the random hash.
TEST(Hash, BalancedTableEvensZipfCounts) {
  const Index ids = 5000, experts = 16;
  std::vector<double> counts(static_cast<std::size_t>(ids));
  for (std::size_t i = 0; i < counts.size(); ++i) counts[i] = 1.0 / double(i + 1);
  const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
  auto busiest = [&](const Hash& router) {
    const Routing<double> routing = route(router, ids_up_to(ids), experts);
    std::vector<double> load(static_cast<std::size_t>(experts), 0.0);
    for (std::size_t i = 0; i < counts.size(); ++i) load[static_cast<std::size_t>(routing.index[i])] += counts[i];
    return *std::max_element(load.begin(), load.end());
  };
  const double balanced = busiest(Hash{{.table = Hash::balanced_table(counts, experts)}});
  EXPECT_LE(balanced, total / double(experts) + counts[0]);
  EXPECT_LT(balanced, busiest(Hash{{.seed = 3}}));
}

using Layer = MoELayer<Hash, NoBalance, Dropless, GroupedGemm, double>;
const LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .seed = 3};

// The layer has no router parameters, asks for the ids, checks them against the tokens and the
// router, and keeps them for every forward until set again.
TEST(HashLayer, TakesTheIdsAndChecksThem) {
  Layer layer(config, Hash{{.table = {3, 1, 0}}});
  for (const auto& p : layer.parameters()) EXPECT_EQ(p.name().rfind("experts.", 0), 0u) << p.name();
  const Matrix<double> x = random_matrix(4, 6, 1);
  EXPECT_EQ(message_of([&] { layer.forward(x); }),
            "moekit::MoELayer::forward: 4 tokens but set_token_ids() gave 0 ids; expected one id per token (Hash "
            "routes by token id)");
  layer.set_token_ids(std::vector<Index>{0, 1, 2, 3});
  EXPECT_EQ(message_of([&] { layer.forward(x); }),
            "moekit::Hash: token 3 has id 3; expected 0 <= id < the table's size, 3");
  layer.set_token_ids(std::vector<Index>{0, 1, 2, 2});
  layer.forward(x);
  EXPECT_EQ(layer.routing().index, (std::vector<Index>{3, 1, 0, 0}));
  layer.forward(x);  // the ids stay
  EXPECT_EQ(std::vector<Index>(layer.tokens_per_expert().begin(), layer.tokens_per_expert().end()),
            (std::vector<Index>{2, 1, 0, 1}));
  EXPECT_EQ(message_of([&] { Layer(config, Hash{{.table = {4}}}); }),
            "moekit::Hash: table[0] = 4 but the layer has 4 experts; expected 0 <= expert < 4");
}

// y is each token's expert's output, weight 1, in training and evaluation alike and at any step:
// the same as a one-expert layer holding that expert's weights.
TEST(HashLayer, EachTokenGetsItsExpertsOutput) {
  Layer layer(config, Hash{{.seed = 9}});
  const Matrix<double> x = random_matrix(50, 6, 2);
  std::vector<Index> ids(50);
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = Index(t * t % 17);
  layer.set_token_ids(ids);
  const Matrix<double> y = layer.forward(x);
  layer.end_step();
  layer.eval();
  EXPECT_EQ(y, layer.forward(x));
  using One = MoELayer<Hash, NoBalance, Dropless, GroupedGemm, double>;
  for (Index e = 0; e < config.experts; ++e) {
    One one({.hidden = 6, .ffn = 5, .experts = 1, .seed = 3});
    for (std::size_t p = 0; p < one.parameters().size(); ++p) {
      const auto whole = layer.parameters()[p].values();
      auto mine = one.parameters()[p].values();
      std::copy_n(whole.begin() + static_cast<std::ptrdiff_t>(e) * std::ssize(mine), mine.size(), mine.begin());
    }
    one.set_token_ids(ids);
    const Matrix<double> alone = one.forward(x);
    for (Index t = 0; t < 50; ++t)
      if (layer.routing().index[static_cast<std::size_t>(t)] == e) {
        EXPECT_LT((y.row(t) - alone.row(t)).norm(), 1e-12 * (1 + alone.row(t).norm())) << "token " << t << ", expert " << e;
      }
  }
}

// A checkpoint holds the experts alone and loads into a layer of another hash.
TEST(HashLayer, SavesAndLoadsWithoutRouterTensors) {
  const auto path = std::filesystem::temp_directory_path() / "moekit_hash_layer.safetensors";
  Layer layer(config, Hash{{.seed = 1}});
  layer.save(path);
  Layer other({.hidden = 6, .ffn = 5, .experts = 4, .seed = 99}, Hash{{.seed = 2}});
  other.load(path);
  std::filesystem::remove(path);
  for (std::size_t p = 0; p < layer.parameters().size(); ++p)
    EXPECT_EQ(layer.parameters()[p].values()[0], other.parameters()[p].values()[0]) << layer.parameters()[p].name();
  EXPECT_EQ(Layer::name(), "Hash_NoBalance_Dropless_GroupedGemmSwiGLU_SingleProcess_f64");
}

}  // namespace
}  // namespace moekit::test
