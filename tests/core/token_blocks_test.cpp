// The policies' loops over tokens run by blocks of policy_token_block in parallel: every
// token is visited once, in the block its number says, and the router's and balancers' results
// are the same bits on one thread and on many, with sums over blocks that agree with the formulas.
#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

// Three blocks, the last one short.
constexpr Index tokens = 2 * policy_token_block + 44, experts = 6;

/// Every double f leaves in `out`, from a run held to `threads` threads.
template <class F>
std::vector<double> on_threads(std::size_t threads, F f) {
  const tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
  std::vector<double> out;
  f(out);
  return out;
}

template <class F>
void expect_same_bits_on_one_thread_and_eight(F f) {
  const auto one = on_threads(1, f), eight = on_threads(8, f);
  ASSERT_EQ(one.size(), eight.size());
  ASSERT_FALSE(one.empty());
  EXPECT_EQ(0, std::memcmp(one.data(), eight.data(), one.size() * sizeof(double)));
}

void append(std::vector<double>& out, const Matrix<double>& m) { out.insert(out.end(), m.data(), m.data() + m.size()); }

TEST(TokenBlocks, VisitEveryTokenOnceInItsBlock) {
  for (Index n : {Index{0}, Index{1}, policy_token_block, policy_token_block + 1, tokens}) {
    std::vector<std::atomic<int>> visits(static_cast<std::size_t>(n));
    std::atomic<Index> blocks_seen{0};
    for_each_token_block(n, [&](Index block, Index first, Index count) {
      EXPECT_EQ(first, block * policy_token_block);
      EXPECT_LE(count, policy_token_block);
      for (Index t = first; t < first + count; ++t) ++visits[static_cast<std::size_t>(t)];
      ++blocks_seen;
    });
    EXPECT_EQ(blocks_seen.load(), token_blocks(n)) << n << " tokens";
    for (const auto& v : visits) EXPECT_EQ(v.load(), 1) << n << " tokens";
  }
}

TEST(TokenBlocks, SumOfBlocksAddsEachColumnOverTheBlocks) {
  const std::vector<float> partial{1, 2, 10, 20, 100, 200};  // three blocks of two columns
  std::vector<double> sum(2, -1.0);
  sum_of_blocks(partial, 3, sum);
  EXPECT_EQ(sum, (std::vector<double>{111, 222}));
}

TEST(TokenBlocks, RouterGivesTheSameBitsOnAnyThreadCount) {
  const auto logits = random_matrix(tokens, experts, 1, 1.5);
  std::vector<double> d_weight(static_cast<std::size_t>(tokens * 2));
  for (std::size_t i = 0; i < d_weight.size(); ++i) d_weight[i] = std::sin(double(i));
  for (const auto& options : {TopK<2>::Options{}, TopK<2>::Options{ScoreFn::sigmoid, true, 2.5}}) {
    expect_same_bits_on_one_thread_and_eight([&](std::vector<double>& out) {
      const TopK<2> router{options};
      Matrix<double> scores = logits, d_logits(tokens, experts);
      router.score(MatrixRef<double>(scores));
      Routing<double> routing;
      router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), routing);
      router.backward(ConstMatrixRef<double>(scores), routing, std::span<const double>(d_weight),
                      MatrixRef<double>(d_logits));
      append(out, scores);
      append(out, d_logits);
      out.insert(out.end(), routing.weight.begin(), routing.weight.end());
      for (Index e : routing.index) out.push_back(double(e));
    });
  }
}

TEST(TokenBlocks, BalancersGiveTheSameBitsOnAnyThreadCount) {
  const auto logits = random_matrix(tokens, experts, 2, 1.5);
  for (ScoreFn f : {ScoreFn::softmax, ScoreFn::sigmoid}) {
    expect_same_bits_on_one_thread_and_eight([&](std::vector<double>& out) {
      Matrix<double> scores = logits;
      TopK<2>{{.score = f}}.score(MatrixRef<double>(scores));
      const BalanceContext context{f, 2};
      AuxLoss::State<double> state;
      out.push_back(AuxLoss{{.coefficient = 0.1}}.forward<double>(scores, context, state));
      Matrix<double> d_logits = Matrix<double>::Zero(tokens, experts);
      AuxLoss{{.coefficient = 0.1}}.backward<double>(scores, context, state, d_logits);
      append(out, d_logits);
      out.insert(out.end(), state.column_sum.begin(), state.column_sum.end());
      for (Index n : state.counts) out.push_back(double(n));
    });
  }
  expect_same_bits_on_one_thread_and_eight([&](std::vector<double>& out) {
    Sinkhorn::State<double> state;
    Matrix<double> selection = logits;
    Sinkhorn{}.select<double>(logits, {}, state, selection);
    append(out, selection);
    out.push_back(double(state.iterations));
  });
  expect_same_bits_on_one_thread_and_eight([&](std::vector<double>& out) {
    AuxFree::State<double> state;
    AuxFree{}.routed<double>(std::vector<Index>{9, 1, 0, 0, 0, 2}, state);
    AuxFree{}.step<double>({}, state);
    Matrix<double> selection(tokens, experts);
    AuxFree{}.select<double>(logits, {}, state, selection);
    append(out, selection);
  });
}

TEST(TokenBlocks, AuxLossOverManyBlocksMatchesTheFormula) {
  const auto logits = random_matrix(tokens, experts, 3, 1.5);
  Matrix<double> scores = logits;
  TopK<2>{}.score(MatrixRef<double>(scores));
  AuxLoss::State<double> state;
  const double loss = AuxLoss{{.coefficient = 1.0}}.forward<double>(scores, {ScoreFn::softmax, 2}, state);
  // n_i from each token's top two, Σ_t s_ti column by column: one pass, no blocks.
  double expected = 0;
  for (Index e = 0; e < experts; ++e) {
    Index count = 0;
    for (Index t = 0; t < tokens; ++t) {
      Index better = 0;
      for (Index j = 0; j < experts; ++j) better += scores(t, j) > scores(t, e);
      count += better < 2;
    }
    EXPECT_EQ(state.counts[static_cast<std::size_t>(e)], count) << "expert " << e;
    expected += double(count) * scores.col(e).sum();
  }
  expected *= double(experts) / (2.0 * double(tokens) * double(tokens));
  EXPECT_NEAR(loss, expected, 1e-12 * expected);
}

TEST(TokenBlocks, AuxLossGradientOverManyBlocksMatchesFiniteDifferences) {
  for (ScoreFn f : {ScoreFn::softmax, ScoreFn::sigmoid}) {
    Matrix<double> logits = random_matrix(tokens, 3, 4, 1.5);
    const AuxLoss aux{{.coefficient = 0.3}};
    const BalanceContext context{f, 1};
    AuxLoss::State<double> state;
    auto scores_of = [&](const Matrix<double>& l) {
      Matrix<double> s = l;
      TopK<1>{{.score = f}}.score(MatrixRef<double>(s));
      return s;
    };
    auto loss = [&] { return aux.forward<double>(scores_of(logits), context, state); };
    loss();
    Matrix<double> d_logits = Matrix<double>::Zero(tokens, 3);
    aux.backward<double>(scores_of(logits), context, state, d_logits);
    std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
    const auto numeric = numeric_gradient(values, loss);
    for (std::size_t i = 0; i < numeric.size(); ++i)
      ASSERT_NEAR(d_logits.data()[i], numeric[i], 1e-9) << to_string(f) << " logit " << i;
  }
}

}  // namespace
}  // namespace moekit::test
