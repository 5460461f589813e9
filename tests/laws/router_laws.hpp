#pragma once
// The laws every Router keeps. Instantiate for your own router in two lines:
//
//   using MyRouters = ::testing::Types<MyRouter, MyRouterWithOptions>;
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, RouterLaws, MyRouters, moekit::laws::CaseName);
//
// A case is the router type (default-constructed) or a struct whose static make() returns one;
// a case whose router needs particular expert counts (groups that divide them) lists them in
// `static constexpr std::array experts{…}`. A router without scores (Hash) is given token ids
// below 1000 instead of scores. A router whose choices vary (ExpertChoice, top_k 0) has one slot
// per expert and must list its expert counts.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <set>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "policy_case.hpp"

namespace moekit::laws {

template <class Case>
class RouterLaws : public ::testing::Test {
 public:
  using R = policy_of<Case>;
  static_assert(Router<R>, "a router law case must make a type that models moekit::Router");
  static constexpr int K = R::top_k;
  const R router = make_policy<Case>();

  LayerShape shape(Index experts) const {
    return {.hidden = 4, .ffn = 4, .experts = experts, .top_k = slots(experts)};
  }

  /// Each token's slots in the routing: K, or E for a router whose choices vary.
  static int slots(Index experts) { return router_choices_vary<R> ? static_cast<int>(experts) : K; }

  /// Whether a slot may be left empty: by a router that draws, or one whose choices vary.
  bool may_leave_empty() const { return draws() || router_choices_vary<R>; }

  /// The expert counts the laws run at: the case's own, or K, K + 3 and 2K + 5.
  static std::vector<Index> expert_counts() {
    if constexpr (requires { Case::experts; })
      return std::vector<Index>(Case::experts.begin(), Case::experts.end());
    else
      return {Index{K}, Index{K + 3}, Index{2 * K + 5}};
  }

  /// Whether the router draws as it selects (RouterDraws): the laws then hold it in training.
  bool draws() const {
    if constexpr (RouterDraws<R>) return router.draws();
    return false;
  }

  /// score then select, picking on the scores themselves; a router that draws selects in
  /// training at `context`. logits [T,E] → scores, in place. A router without scores picks for
  /// as many tokens by their ids (token_ids()).
  Routing<double> route(Matrix<double>& logits_then_scores, RouterContext context = {.step = 1}) const {
    if constexpr (!router_scores<R>) {
      const std::vector<Index> ids = token_ids(logits_then_scores.rows());
      context.token_ids = ids;
      Routing<double> routing;
      router.select(context, logits_then_scores.cols(), routing);
      return routing;
    } else {
      router.score(MatrixRef<double>(logits_then_scores));
      return choose(logits_then_scores, context);
    }
  }

  /// Ids below 1000 that repeat every 1000 tokens.
  static std::vector<Index> token_ids(Index tokens) {
    std::vector<Index> ids(static_cast<std::size_t>(tokens));
    for (Index t = 0; t < tokens; ++t) ids[static_cast<std::size_t>(t)] = (t * 37 + 11) % 1000;
    return ids;
  }

  Routing<double> choose(const Matrix<double>& scores, const RouterContext& context) const
    requires router_scores<R>
  {
    Routing<double> routing;
    const ConstMatrixRef<double> s(scores);
    if constexpr (RouterDraws<R>)
      if (router.draws()) {
        router.select(s, s, context, routing);
        return routing;
      }
    router.select(s, s, routing);
    return routing;
  }
};

TYPED_TEST_SUITE_P(RouterLaws);

// K distinct experts of [0, E) per token, finite weights, on random logits, ties and huge logits.
// A router that draws or whose choices vary may leave a choice empty: it still names a distinct
// expert, with weight 0.
TYPED_TEST_P(RouterLaws, ChoosesKDistinctExpertsWithFiniteWeights) {
  for (const Index experts : TestFixture::expert_counts()) {
    const int K = TestFixture::slots(experts);
    this->router.validate(this->shape(experts));
    for (const Index tokens : {0, 1, 37, 300}) {
      Matrix<double> scores = test::random_matrix(tokens, experts, static_cast<unsigned>(tokens + experts), 2.0);
      if (tokens > 2) {
        scores.row(0).setConstant(0.5);  // every expert ties
        scores.row(1).setConstant(-1e4);
        scores(1, experts - 1) = 1e4;
      }
      const Routing<double> routing = this->route(scores);
      ASSERT_EQ(routing.tokens, tokens);
      ASSERT_EQ(routing.top_k, K);
      ASSERT_EQ(routing.index.size(), static_cast<std::size_t>(tokens * K));
      ASSERT_EQ(routing.weight.size(), static_cast<std::size_t>(tokens * K));
      for (Index t = 0; t < tokens; ++t) {
        std::set<Index> chosen;
        for (int k = 0; k < K; ++k) {
          const auto c = static_cast<std::size_t>(t * K + k);
          const Index expert = Routing<double>::expert_of(routing.index[c]);
          EXPECT_TRUE(!Routing<double>::is_empty(routing.index[c]) || (this->may_leave_empty() && routing.weight[c] == 0))
              << "token " << t << ", choice " << k << " left empty";
          EXPECT_GE(expert, 0) << "token " << t;
          EXPECT_LT(expert, experts) << "token " << t;
          EXPECT_TRUE(std::isfinite(routing.weight[c])) << "token " << t << ", choice " << k;
          chosen.insert(expert);
        }
        EXPECT_EQ(chosen.size(), static_cast<std::size_t>(K)) << "token " << t << " chose an expert twice";
      }
    }
  }
}

// d_logits from backward equals the central differences of L = Σ g ⊙ weight(logits), the choices
// held (random logits leave no choice within the step of a tie). A router without scores has no
// backward: what it picks is a fixed function of the ids, the same at any step and mode, so
// nothing the layer learns reaches it.
TYPED_TEST_P(RouterLaws, BackwardMatchesCentralDifferences) {
  if constexpr (!router_scores<typename TestFixture::R>) {
    constexpr int K = TestFixture::K;
    Matrix<double> tokens(1500, TestFixture::expert_counts().back());
    const Routing<double> first = this->route(tokens, {.step = 1});
    const Routing<double> later = this->route(tokens, {.training = false, .step = 9, .first_token = 40});
    EXPECT_EQ(first.index, later.index);
    EXPECT_EQ(first.weight, later.weight);
    for (Index t = 1000; t < 1500; ++t)  // the ids of tokens 0-499 again
      for (int k = 0; k < K; ++k) {
        const auto c = static_cast<std::size_t>(t * K + k), same = static_cast<std::size_t>((t - 1000) * K + k);
        ASSERT_EQ(first.index[c], first.index[same]) << "token " << t;
        ASSERT_EQ(first.weight[c], first.weight[same]) << "token " << t;
      }
  } else {
    const Index tokens = 6, experts = TestFixture::expert_counts()[1 % TestFixture::expert_counts().size()];
    Matrix<double> logits = test::random_matrix(tokens, experts, 5, 2.0);
    const Matrix<double> g = test::random_matrix(tokens, TestFixture::slots(experts), 6);
    auto loss = [&] {
      Matrix<double> scores = logits;
      const auto routing = this->route(scores);
      double sum = 0;
      for (std::size_t c = 0; c < routing.weight.size(); ++c) sum += g.data()[c] * routing.weight[c];
      return sum;
    };
    Matrix<double> scores = logits;
    const Routing<double> routing = this->route(scores);
    Matrix<double> d_logits = Matrix<double>::Constant(tokens, experts, 99.0);  // backward writes every entry
    this->router.backward(ConstMatrixRef<double>(scores), routing, std::span<const double>(g.data(), g.size()),
                          MatrixRef<double>(d_logits));
    std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
    const auto numeric = test::numeric_gradient(values, loss);
    EXPECT_LT(test::compare(std::vector<double>(d_logits.data(), d_logits.data() + d_logits.size()), numeric), 1e-7);
  }
}

// The same choices, weights and gradient, bit for bit, on one thread and on four.
TYPED_TEST_P(RouterLaws, SameBitsOnAnyThreadCount) {
  const Index tokens = 1000, experts = TestFixture::expert_counts().back();
  const Matrix<double> logits = test::random_matrix(tokens, experts, 7, 2.0);
  const Matrix<double> g = test::random_matrix(tokens, TestFixture::slots(experts), 8);
  auto run = [&] {
    Matrix<double> scores = logits;
    Routing<double> routing = this->route(scores);
    Matrix<double> d_logits(tokens, experts);
    if constexpr (router_scores<typename TestFixture::R>)
      this->router.backward(ConstMatrixRef<double>(scores), routing, std::span<const double>(g.data(), g.size()),
                            MatrixRef<double>(d_logits));
    else
      d_logits.setZero();  // no backward
    return std::tuple(routing.index, routing.weight, d_logits);
  };
  const auto one = on_threads(1, run), four = on_threads(4, run);
  EXPECT_EQ(std::get<0>(one), std::get<0>(four));
  EXPECT_EQ(std::get<1>(one), std::get<1>(four));
  EXPECT_TRUE(std::get<2>(one) == std::get<2>(four));
}

// A router that draws does so by the counter alone: at evaluation it selects as its plain select;
// the same step draws the same; a batch cut in two, each part told its first token, draws what
// the whole does (as over ranks). Skipped for a router that does not draw.
TYPED_TEST_P(RouterLaws, DrawsOnlyInTrainingAndByTheCounter) {
  if (!this->draws()) GTEST_SKIP() << "the router draws nothing";
  if constexpr (router_scores<typename TestFixture::R>) {
    const Index experts = TestFixture::expert_counts().back();
    Matrix<double> scores = test::random_matrix(300, experts, 9, 2.0);
    this->router.score(MatrixRef<double>(scores));
    Routing<double> plain;
    this->router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), plain);
    const Routing<double> evaluation = this->choose(scores, {.training = false, .step = 1});
    EXPECT_EQ(evaluation.index, plain.index);
    EXPECT_EQ(evaluation.weight, plain.weight);

    const Routing<double> whole = this->choose(scores, {.step = 4});
    EXPECT_EQ(this->choose(scores, {.step = 4}).index, whole.index);
    const Routing<double> head = this->choose(scores.topRows(100), {.step = 4});
    const Routing<double> tail = this->choose(scores.bottomRows(200), {.step = 4, .first_token = 100});
    std::vector<Index> parts = head.index;
    parts.insert(parts.end(), tail.index.begin(), tail.index.end());
    EXPECT_EQ(parts, whole.index);
    std::vector<double> part_weights = head.weight;
    part_weights.insert(part_weights.end(), tail.weight.begin(), tail.weight.end());
    EXPECT_EQ(part_weights, whole.weight);
  }
}

// More choices than experts is refused by name, before any token is routed.
TYPED_TEST_P(RouterLaws, RefusesMoreChoicesThanExperts) {
  constexpr int K = TestFixture::K;
  if constexpr (K > 1) {
    EXPECT_THROW(this->router.validate(this->shape(K - 1)), error);
  }
  EXPECT_NO_THROW(this->router.validate(this->shape(TestFixture::expert_counts().front())));
}

REGISTER_TYPED_TEST_SUITE_P(RouterLaws, ChoosesKDistinctExpertsWithFiniteWeights, BackwardMatchesCentralDifferences,
                            SameBitsOnAnyThreadCount, DrawsOnlyInTrainingAndByTheCounter, RefusesMoreChoicesThanExperts);

}  // namespace moekit::laws
