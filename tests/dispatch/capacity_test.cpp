// Capacity plans: hand-computed cases for each drop policy, padding and Tutel's factor 0; and
// properties over random routings.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <random>
#include <utility>
#include <vector>

#include <moekit/dispatch/capacity.hpp>

namespace moekit::test {
namespace {

/// Four tokens, all to expert 0 of 2, top-1, with weights 0.3 0.9 0.5 0.7: C = ceil(4/2) = 2.
Routing<double> crowded() {
  Routing<double> r;
  r.resize(4, 1);
  r.index = {0, 0, 0, 0};
  r.weight = {0.3, 0.9, 0.5, 0.7};
  return r;
}

constexpr Index none = Plan::no_slot;

TEST(Capacity, ByWeightKeepsTheHeaviestInTokenOrder) {
  Plan plan;
  Capacity{}.plan(crowded(), 2, plan);
  EXPECT_EQ(plan.source, (std::vector<Index>{1, 3}));
  EXPECT_EQ(plan.slot, (std::vector<Index>{none, 0, none, 1}));
  EXPECT_EQ(plan.counts, (std::vector<Index>{2, 0}));
  EXPECT_EQ(plan.dropped, 2);
}

TEST(Capacity, ByPositionKeepsTheEarliest) {
  Plan plan;
  Capacity{{.drop = DropPolicy::position}}.plan(crowded(), 2, plan);
  EXPECT_EQ(plan.source, (std::vector<Index>{0, 1}));
  EXPECT_EQ(plan.slot, (std::vector<Index>{0, 1, none, none}));
  EXPECT_EQ(plan.dropped, 2);
}

TEST(Capacity, PaddingGivesEveryExpertExactlyCRows) {
  Plan plan;
  Capacity{{.pad = true}}.plan(crowded(), 2, plan);
  EXPECT_EQ(plan.source, (std::vector<Index>{1, 3, none, none}));
  EXPECT_EQ(plan.offsets, (std::vector<Index>{0, 2, 4}));
}

TEST(Capacity, FactorZeroIsDroplessPaddedToTheLargestCount) {
  Routing<double> r;
  r.resize(4, 1);
  r.index = {0, 1, 0, 0};
  r.weight = {1, 1, 1, 1};
  Plan plan;
  Capacity{{.capacity_factor = 0}}.plan(r, 2, plan);
  EXPECT_EQ(plan.dropped, 0);
  EXPECT_EQ(plan.source, (std::vector<Index>{0, 2, 3, 1, none, none}));
}

TEST(Capacity, MinimumCapacityAndItsErrors) {
  EXPECT_EQ((Capacity{{.capacity_factor = 0.1, .min_capacity = 3}}.capacity(4, 1, 2, 4)), 3);
  EXPECT_EQ((Capacity{{.capacity_factor = 1.25}}.capacity(16, 2, 8, 9)), 5);  // ceil(4 · 1.25)
  EXPECT_EQ((Capacity{{.capacity_factor = 3, .pad = true}}.capacity(4, 1, 2, 4)), 4);  // capped at T
  Plan plan;
  EXPECT_THROW((Capacity{{.capacity_factor = 1e-12}}.plan(crowded(), 2, plan)), error);
  EXPECT_THROW((Capacity{{.capacity_factor = -1}}.validate({})), error);
  EXPECT_THROW((Capacity{{.min_capacity = -1}}.validate({})), error);
}

TEST(Capacity, PlansHoldTheirLawsOverRandomRoutings) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const Index experts = 1 + static_cast<Index>(rng() % 8);
    const int k = 1 + static_cast<int>(rng() % static_cast<unsigned>(std::min<Index>(experts, 3)));
    const Index tokens = static_cast<Index>(rng() % 30);
    Routing<double> r;
    r.resize(tokens, k);
    std::uniform_real_distribution<double> w(0, 1);
    for (Index t = 0; t < tokens; ++t) {
      // Skewed: low experts far more often, so drops happen. One key per expert, drawn first: a
      // comparator must give the same answer each time it is asked.
      std::vector<std::pair<double, Index>> order;
      for (Index e = 0; e < experts; ++e) order.emplace_back(double(e) * w(rng), e);
      std::sort(order.begin(), order.end());
      for (int j = 0; j < k; ++j) {
        r.index[static_cast<std::size_t>(t * k + j)] = order[static_cast<std::size_t>(j)].second;
        r.weight[static_cast<std::size_t>(t * k + j)] = w(rng);
      }
    }
    const Capacity policy{{.capacity_factor = std::array{0.0, 0.5, 1.0, 1.25}[static_cast<std::size_t>(trial % 4)],
                           .drop = trial % 3 ? DropPolicy::weight : DropPolicy::position,
                           .pad = trial % 2 == 0}};
    Plan plan;
    policy.plan(r, experts, plan);
    Index largest = 0;
    for (Index e = 0; e < experts; ++e)
      largest = std::max<Index>(largest, std::count(r.index.begin(), r.index.end(), e));
    const Index cap = policy.capacity(tokens, k, experts, largest);
    Index kept = 0;
    for (Index c = 0; c < r.choices(); ++c) {
      const Index row = plan.slot[static_cast<std::size_t>(c)];
      if (row == none) continue;
      ++kept;
      EXPECT_EQ(plan.source[static_cast<std::size_t>(row)], c);  // the plan inverts
      const Index e = r.index[static_cast<std::size_t>(c)];
      EXPECT_GE(row, plan.offsets[static_cast<std::size_t>(e)]);
      EXPECT_LT(row, plan.offsets[static_cast<std::size_t>(e + 1)]);
    }
    EXPECT_EQ(kept + plan.dropped, r.choices());
    Index filled = 0;
    for (Index row = 0; row < plan.rows(); ++row) filled += plan.source[static_cast<std::size_t>(row)] != none;
    EXPECT_EQ(filled, kept);  // every kept pair appears exactly once
    for (Index e = 0; e < experts; ++e) {
      const Index size = plan.counts[static_cast<std::size_t>(e)];
      if (policy.pads()) {
        EXPECT_EQ(size, cap);
      } else {
        EXPECT_LE(size, cap);
      }
      if (policy.options.drop != DropPolicy::weight) continue;
      double lightest_kept = 2;  // no dropped choice outweighs a kept one of the same expert
      for (Index c = 0; c < r.choices(); ++c)
        if (r.index[static_cast<std::size_t>(c)] == e && plan.slot[static_cast<std::size_t>(c)] != none)
          lightest_kept = std::min(lightest_kept, r.weight[static_cast<std::size_t>(c)]);
      for (Index c = 0; c < r.choices(); ++c) {
        if (r.index[static_cast<std::size_t>(c)] == e && plan.slot[static_cast<std::size_t>(c)] == none) {
          EXPECT_LE(r.weight[static_cast<std::size_t>(c)], lightest_kept);
        }
      }
    }
    if (policy.options.capacity_factor == 0) {
      EXPECT_EQ(plan.dropped, 0);
    }
  }
}

}  // namespace
}  // namespace moekit::test
