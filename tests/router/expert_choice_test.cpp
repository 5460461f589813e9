// Expert Choice routing (Zhou et al. 2022): each expert takes its C best tokens, C = ⌈T · cf / E⌉;
// by hand, over a batch cut between ranks, and in the layer.
#include <gtest/gtest.h>

#include <vector>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

Routing<double> choose(const ExpertChoice& router, const Matrix<double>& scores) {
  Routing<double> routing;
  router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), routing);
  return routing;
}

/// The experts that took token t.
std::vector<Index> experts_of(const Routing<double>& routing, Index t) {
  std::vector<Index> taken;
  for (int e = 0; e < routing.top_k; ++e)
    if (!Routing<double>::is_empty(routing.index[static_cast<std::size_t>(t * routing.top_k + e)])) taken.push_back(e);
  return taken;
}

TEST(ExpertChoice, CapacityIsTokensTimesFactorOverExperts) {
  const ExpertChoice cf2{};
  EXPECT_EQ(cf2.capacity(10, 4), 5);
  EXPECT_EQ(cf2.capacity(11, 4), 6);   // ⌈5.5⌉
  EXPECT_EQ(cf2.capacity(7, 1), 7);    // at most T: 14 would repeat tokens
  EXPECT_EQ(cf2.capacity(0, 4), 0);
  EXPECT_EQ(ExpertChoice{{.capacity_factor = 1.1}}.capacity(80, 8), 11);  // 11.000…2 in binary: still 11
  EXPECT_EQ(ExpertChoice{{.capacity_factor = 0.5}}.capacity(3, 4), 1);   // ⌈0.375⌉: never 0 for T > 0
}

// Scores of 5 tokens for 2 experts, C = ⌈5 · 1 / 2⌉ = 3: expert 0 takes tokens 4, 0 and 2 (2 and 3
// tie: the lower token), expert 1 tokens 1, 3 and 4. Token 4 gets both, token 0 and 2 expert 0
// alone; each weight is the token's score for the expert.
TEST(ExpertChoice, EachExpertTakesItsBestTokensByHand) {
  Matrix<double> scores(5, 2);
  scores << 0.7, 0.3,  //
      0.2, 0.8,        //
      0.5, 0.5,        //
      0.5, 0.6,        //
      0.9, 0.95;  // scores need not sum to 1 here: select reads them as given
  const Routing<double> routing = choose(ExpertChoice{{.capacity_factor = 1.0}}, scores);
  ASSERT_EQ(routing.tokens, 5);
  ASSERT_EQ(routing.top_k, 2);
  EXPECT_EQ(experts_of(routing, 0), (std::vector<Index>{0}));
  EXPECT_EQ(experts_of(routing, 1), (std::vector<Index>{1}));
  EXPECT_EQ(experts_of(routing, 2), (std::vector<Index>{0}));
  EXPECT_EQ(experts_of(routing, 3), (std::vector<Index>{1}));
  EXPECT_EQ(experts_of(routing, 4), (std::vector<Index>{0, 1}));
  const std::vector<double> weights{0.7, 0, 0, 0.8, 0.5, 0, 0, 0.6, 0.9, 0.95};
  EXPECT_EQ(routing.weight, weights);
  EXPECT_EQ(routing.index[1], Routing<double>::left_empty(1));  // an empty slot names its expert
}

/// The ranks of a batch cut in parts, as one process plays them: rank r gathers every part.
class PartsOfABatch : public BatchGroup {
 public:
  PartsOfABatch(std::vector<std::vector<double>> parts, int rank) : parts_(std::move(parts)), rank_(rank) {}
  int size() const override { return static_cast<int>(parts_.size()); }
  int rank() const override { return rank_; }
  void gather(std::span<const double> mine, std::vector<double>& all, std::vector<Index>& counts) const override {
    EXPECT_TRUE(std::equal(mine.begin(), mine.end(), parts_[static_cast<std::size_t>(rank_)].begin(),
                           parts_[static_cast<std::size_t>(rank_)].end()));
    all.clear();
    counts.clear();
    for (const auto& part : parts_) {
      all.insert(all.end(), part.begin(), part.end());
      counts.push_back(static_cast<Index>(part.size()));
    }
  }

 private:
  std::vector<std::vector<double>> parts_;
  int rank_;
};

// Over a batch group, each rank's choices are its rows of the whole batch's: C is the whole
// batch's and an expert may take all of its tokens from one rank.
TEST(ExpertChoice, OverABatchGroupEachRankGetsItsRowsOfTheWholeChoice) {
  const ExpertChoice router{};
  Matrix<double> scores = random_matrix<double>(50, 6, 3, 2.0);
  router.score(MatrixRef<double>(scores));
  scores.topRows(20).col(2).array() += 1.0;  // expert 2 prefers the first rank's tokens: it takes them all there
  const Routing<double> whole = choose(router, scores);
  const Index cut[3] = {0, 20, 50};
  std::vector<std::vector<double>> parts;
  for (int r = 0; r < 2; ++r) {
    const Matrix<double> part = scores.middleRows(cut[r], cut[r + 1] - cut[r]);
    parts.emplace_back(part.data(), part.data() + part.size());
  }
  std::vector<Index> index;
  std::vector<double> weight;
  for (int r = 0; r < 2; ++r) {
    const PartsOfABatch batch(parts, r);
    const Matrix<double> part = scores.middleRows(cut[r], cut[r + 1] - cut[r]);
    Routing<double> routing;
    router.select(ConstMatrixRef<double>(part), ConstMatrixRef<double>(part), RouterContext{.batch = &batch}, routing);
    ASSERT_EQ(routing.tokens, cut[r + 1] - cut[r]);
    index.insert(index.end(), routing.index.begin(), routing.index.end());
    weight.insert(weight.end(), routing.weight.begin(), routing.weight.end());
  }
  EXPECT_EQ(index, whole.index);
  EXPECT_EQ(weight, whole.weight);
  Index second_rank_for_expert_2 = 0;
  for (Index t = 20; t < 50; ++t) second_rank_for_expert_2 += !Routing<double>::is_empty(index[static_cast<std::size_t>(t * 6 + 2)]);
  EXPECT_EQ(second_rank_for_expert_2, 0);  // C = ⌈50 · 2 / 6⌉ = 17 of the first rank's 20
}

TEST(ExpertChoice, RefusesACapacityFactorThatIsNotPositive) {
  for (const double bad : {0.0, -1.0, std::nan("")}) {
    const std::string message = message_of([&] { ExpertChoice{{.capacity_factor = bad}}.validate({.experts = 4}); });
    EXPECT_NE(message.find("moekit::ExpertChoice: capacity_factor = "), std::string::npos) << message;
    EXPECT_NE(message.find("expected a finite number > 0"), std::string::npos) << message;
  }
  using Layer = MoELayer<ExpertChoice, NoBalance, Dropless, double>;
  EXPECT_NE(message_of([] { Layer({.hidden = 4, .ffn = 4, .experts = 4}, ExpertChoice{{.capacity_factor = 0}}); })
                .find("capacity_factor = 0"),
            std::string::npos);
}

// In the layer: every expert gets exactly C rows and nothing is dropped; the routing is the same
// in training and at evaluation (nothing is drawn); a checkpoint names no top K, and the name
// has none.
TEST(ExpertChoiceLayer, EvenLoadSameInEvaluationAndNoTopKInItsName) {
  using Layer = MoELayer<ExpertChoice, NoBalance, Dropless, double>;
  Layer layer({.hidden = 8, .ffn = 6, .experts = 5, .seed = 2});
  EXPECT_EQ(Layer::name(), "ExpertChoice_NoBalance_Dropless_GroupedGemmSwiGLU_SingleProcess_f64");
  const Matrix<double> x = random_matrix<double>(23, 8, 4);
  const Matrix<double> y = layer.forward(x);
  const std::vector<Index> trained = layer.routing().index;
  for (const Index n : layer.tokens_per_expert()) EXPECT_EQ(n, 10);  // ⌈23 · 2 / 5⌉
  EXPECT_EQ(layer.stats().choices, 50);
  EXPECT_EQ(layer.stats().dropped, 0);
  EXPECT_DOUBLE_EQ(layer.stats().max_over_mean, 1.0);
  layer.eval();
  EXPECT_EQ(layer.forward(x), y);
  EXPECT_EQ(layer.routing().index, trained);
  const auto checkpoint = layer.checkpoint();
  EXPECT_EQ(checkpoint.metadata().count("topk"), 0u);
  EXPECT_EQ(checkpoint.metadata().at("experts"), "5");
}

}  // namespace
}  // namespace moekit::test
