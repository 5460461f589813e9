#pragma once
// The laws every Dispatcher keeps. Instantiate for your own dispatcher in two lines:
//
//   using MyDispatchers = ::testing::Types<MyDispatcher>;
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, DispatcherLaws, MyDispatchers, moekit::laws::CaseName);
//
// Routings come from TopK<1> (where the dispatcher's validate accepts K = 1), TopK<2> and TopK<3>
// on random logits, over many shapes: no tokens, one token, one expert per choice, every token
// to one expert.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/random.hpp"
#include "policy_case.hpp"

namespace moekit::laws {

/// An expert that returns its rows unchanged and owns no parameters: the layer is then its
/// permutation alone.
struct IdentityExperts {
  using policy_kind = expert_kind;
  static constexpr std::string_view name = "IdentityExperts";
  template <Scalar T>
  struct Saved {};
  static std::vector<ParameterSpec> parameters(const LayerShape&, Index) { return {}; }
  void validate(const LayerShape&) const {}
  template <Scalar T>
  void forward(std::span<const Tensor<T>>, ConstMatrixRef<T> rows, std::span<const Index>, MatrixRef<T> out, Saved<T>&,
               Workspace<T>&) const {
    out = rows;
  }
  template <Scalar T>
  void backward(std::span<const Tensor<T>>, MatrixRef<T> rows_then_d_rows, std::span<const Index>, Saved<T>&,
                ConstMatrixRef<T> d_out, std::span<Tensor<T>>, Workspace<T>&) const {
    rows_then_d_rows = d_out;
  }
};
static_assert(Expert<IdentityExperts>);

template <class Case>
class DispatcherLaws : public ::testing::Test {
 public:
  using D = policy_of<Case>;
  static_assert(Dispatcher<D>, "a dispatcher law case must make a type that models moekit::Dispatcher");
  const D dispatcher = make_policy<Case>();

  /// body(layer, tokens) for a layer of random sizes for a seed: E in [K, K + 5], T in [0, 24];
  /// every fifth seed sends every token to expert 0 (all logits tie).
  template <int K, class Body>
  void with_layer(unsigned seed, Body body) const {
    if (K == 1 && !accepts_one_choice()) return;
    std::mt19937 rng(seed);
    const Index experts = K + static_cast<Index>(rng() % 6);
    const Index tokens = static_cast<Index>(rng() % 25);
    MoELayer<TopK<K>, NoBalance, D, IdentityExperts, double> layer({.hidden = 3, .ffn = 1, .experts = experts, .seed = seed},
                                                                    dispatcher);
    if (seed % 5 == 0) layer.parameter("router.weight").set_zero();
    body(layer, tokens);
  }

  bool accepts_one_choice() const {
    try {
      dispatcher.validate({.hidden = 3, .ffn = 1, .experts = 2, .top_k = 1});
      return true;
    } catch (const error&) {
      return false;  // e.g. Capacity's renormalize, which K = 1 would turn into a constant weight
    }
  }
};

TYPED_TEST_SUITE_P(DispatcherLaws);

template <int K, class Fixture>
void expect_consistent_plans(const Fixture& fixture) {
  for (unsigned seed = 0; seed < 40; ++seed) {
    fixture.template with_layer<K>(seed, [&](auto& layer, Index tokens) {
      layer.forward(test::random_matrix(tokens, 3, seed));
      const Plan& plan = layer.plan();
      const Routing<double>& routing = layer.routing();
      const auto experts = static_cast<std::size_t>(layer.shape().experts);
      ASSERT_EQ(plan.offsets.size(), experts + 1);
      EXPECT_EQ(plan.offsets[0], 0);
      for (std::size_t e = 0; e < experts; ++e) EXPECT_EQ(plan.offsets[e + 1] - plan.offsets[e], plan.counts[e]);
      ASSERT_EQ(plan.source.size(), static_cast<std::size_t>(plan.rows()));
      Index dropped = 0;
      for (std::size_t c = 0; c < plan.slot.size(); ++c) {  // each kept choice has a row in its expert's block
        const Index row = plan.slot[c];
        if (row == Plan::no_slot) {
          ++dropped;
          continue;
        }
        const auto e = static_cast<std::size_t>(routing.index[c]);
        EXPECT_TRUE(plan.offsets[e] <= row && row < plan.offsets[e + 1]) << "seed " << seed << ", choice " << c;
        EXPECT_EQ(plan.source[static_cast<std::size_t>(row)], static_cast<Index>(c)) << "seed " << seed;
      }
      EXPECT_EQ(plan.dropped, dropped) << "seed " << seed;
      for (std::size_t e = 0; e < experts; ++e) {  // each row a kept choice's or padding, in token order
        Index last = -1;
        for (Index r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
          const Index c = plan.source[static_cast<std::size_t>(r)];
          if (c == Plan::no_slot) continue;
          EXPECT_EQ(plan.slot[static_cast<std::size_t>(c)], r) << "seed " << seed;
          EXPECT_GT(c, last) << "seed " << seed << ", expert " << e;
          last = c;
        }
      }
    });
  }
}

// The plan is a permutation: each kept choice has one row in its expert's block, each row one
// kept choice or padding, counts and offsets agree, and kept choices stay in token order.
TYPED_TEST_P(DispatcherLaws, PlanIsAConsistentPermutation) {
  expect_consistent_plans<1>(*this);
  expect_consistent_plans<2>(*this);
  expect_consistent_plans<3>(*this);
}

template <int K, class Fixture>
void expect_weighted_input(const Fixture& fixture) {
  for (unsigned seed = 0; seed < 40; ++seed) {
    fixture.template with_layer<K>(seed, [&](auto& layer, Index tokens) {
      const Matrix<double> x = test::random_matrix(tokens, 3, seed), dy = test::random_matrix(tokens, 3, seed + 1000);
      const Matrix<double> y = layer.forward(x);
      layer.zero_grad();
      const Matrix<double> dx = layer.backward(dy);
      for (Index t = 0; t < tokens; ++t) {
        double weight = 0;  // Σ_k w_tk over the kept choices, as the layer weighs them
        bool any_kept = false;
        for_each_kept_choice(layer.plan(), t, [&](std::size_t c, Index) {
          weight += layer.routing().weight[c];
          any_kept = true;
        });
        EXPECT_LT((y.row(t) - weight * x.row(t)).cwiseAbs().maxCoeff(), 1e-14) << "seed " << seed << ", token " << t;
        if (!any_kept) {
          EXPECT_TRUE(dx.row(t).isZero(0)) << "seed " << seed << ", token " << t << ": dropped, yet a gradient";
        }
      }
    });
  }
}

// With identity experts, combine(gather(x)) = Σ_k w_k · x over the kept choices, and a token
// whose choices were all dropped gets neither output nor gradient.
TYPED_TEST_P(DispatcherLaws, CombineOfGatherIsTheWeightedInput) {
  expect_weighted_input<1>(*this);
  expect_weighted_input<2>(*this);
  expect_weighted_input<3>(*this);
}

REGISTER_TYPED_TEST_SUITE_P(DispatcherLaws, PlanIsAConsistentPermutation, CombineOfGatherIsTheWeightedInput);

}  // namespace moekit::laws
