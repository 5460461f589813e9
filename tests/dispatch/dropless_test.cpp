// Dropless plans: every choice gets exactly one row, blocks are contiguous and in expert order,
// rows inside a block keep token order, and the plan inverts.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include <moekit/dispatch/dropless.hpp>

namespace moekit::test {
namespace {

Routing<double> random_routing(Index tokens, int k, Index experts, unsigned seed) {
  std::mt19937 rng(seed);
  Routing<double> r;
  r.resize(tokens, k);
  for (Index t = 0; t < tokens; ++t) {
    std::vector<Index> all(static_cast<std::size_t>(experts));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; j < k; ++j) r.index[static_cast<std::size_t>(t * k + j)] = all[static_cast<std::size_t>(j)];
  }
  return r;
}

void expect_valid_dropless_plan(const Routing<double>& routing, Index experts) {
  Plan plan;
  Dropless{}.plan(routing, experts, plan);
  ASSERT_EQ(plan.rows(), routing.choices());
  EXPECT_EQ(plan.dropped, 0);
  std::vector<int> seen(static_cast<std::size_t>(plan.rows()), 0);
  for (Index c = 0; c < routing.choices(); ++c) {
    const Index row = plan.slot[static_cast<std::size_t>(c)];
    ASSERT_GE(row, 0);
    ++seen[static_cast<std::size_t>(row)];
    EXPECT_EQ(plan.source[static_cast<std::size_t>(row)], c);  // the plan inverts
    const Index e = routing.index[static_cast<std::size_t>(c)];
    EXPECT_GE(row, plan.offsets[static_cast<std::size_t>(e)]);  // inside its expert's block
    EXPECT_LT(row, plan.offsets[static_cast<std::size_t>(e + 1)]);
  }
  for (int n : seen) EXPECT_EQ(n, 1);  // every row filled exactly once
  for (Index e = 0; e < experts; ++e) {
    EXPECT_EQ(plan.counts[static_cast<std::size_t>(e)], plan.offsets[static_cast<std::size_t>(e + 1)] - plan.offsets[static_cast<std::size_t>(e)]);
    for (Index r = plan.offsets[static_cast<std::size_t>(e)] + 1; r < plan.offsets[static_cast<std::size_t>(e + 1)]; ++r)
      EXPECT_LT(plan.source[static_cast<std::size_t>(r - 1)], plan.source[static_cast<std::size_t>(r)]);  // stable
  }
}

TEST(Dropless, EveryChoiceGetsExactlyOneRowInItsExpertsBlock) {
  for (unsigned seed = 0; seed < 20; ++seed) {
    std::mt19937 rng(seed);
    const Index experts = 1 + static_cast<Index>(rng() % 9);
    const int k = 1 + static_cast<int>(rng() % static_cast<unsigned>(experts));
    const Index tokens = static_cast<Index>(rng() % 40);
    expect_valid_dropless_plan(random_routing(tokens, k, experts, seed), experts);
  }
}

TEST(Dropless, EdgeCases) {
  expect_valid_dropless_plan(random_routing(0, 2, 4, 1), 4);  // no tokens
  expect_valid_dropless_plan(random_routing(1, 1, 1, 1), 1);  // one token, one expert
  Routing<double> all_to_one;
  all_to_one.resize(10, 1);
  std::fill(all_to_one.index.begin(), all_to_one.index.end(), 3);
  expect_valid_dropless_plan(all_to_one, 5);
}

TEST(Dropless, HandComputedPlan) {
  Routing<double> r;
  r.resize(3, 2);
  r.index = {2, 0, 0, 1, 2, 1};  // token 0 → {2,0}, token 1 → {0,1}, token 2 → {2,1}
  Plan plan;
  Dropless{}.plan(r, 3, plan);
  EXPECT_EQ(plan.counts, (std::vector<Index>{2, 2, 2}));
  EXPECT_EQ(plan.offsets, (std::vector<Index>{0, 2, 4, 6}));
  EXPECT_EQ(plan.source, (std::vector<Index>{1, 2, 3, 5, 0, 4}));
  EXPECT_EQ(plan.slot, (std::vector<Index>{4, 0, 1, 2, 5, 3}));
}

}  // namespace
}  // namespace moekit::test
