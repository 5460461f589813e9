#pragma once
// The check of the MPI layer tests: the layer over ranks computes what one process computes for
// the whole batch (outputs, input gradients, parameter gradients after reduce_gradients(), the
// balancer's loss and state), in every layout the world size allows.
#include <gtest/gtest.h>

#include <functional>
#include <numeric>
#include <vector>

#include "support.hpp"

namespace moekit::test {

struct Layout {
  std::string name;
  ExpertParallel::Groups groups;
  ExpertParallel::Options options{};
};

/// EP over every rank; EP with a hierarchical all-to-all (2 ranks a node); expert tensor
/// parallel (ETP = 2); expert data parallel (EDP = 2); the exchange in chunks, overlapped.
inline const std::vector<Layout>& layouts() {
  static const std::vector<Layout> all = [] {
    const int size = world().size();
    std::vector<Layout> l;
    l.push_back({"ep" + std::to_string(size), ExpertParallel::groups(world())});
    if (size % 2 == 0) {
      l.push_back({"etp2", ExpertParallel::groups(world(), ParallelLayout(size, {.ep = size / 2, .etp = 2}))});
      l.push_back({"edp2", ExpertParallel::groups(world(), ParallelLayout(size, {.ep = size / 2, .etp = 1}))});
    }
    l.push_back({"ep" + std::to_string(size) + "_3chunks", ExpertParallel::groups(world()), {.chunks = 3}});
    if (size % 2 == 0)
      l.push_back({"etp2_2chunks", ExpertParallel::groups(world(), ParallelLayout(size, {.ep = size / 2, .etp = 2})),
                   {.chunks = 2}});
    if (size >= 4 && size % 2 == 0)
      l.push_back({"ep" + std::to_string(size) + "_hierarchical", ExpertParallel::groups(world()), {.ranks_per_node = 2}});
    return l;
  }();
  return all;
}

template <class Layer>
using OneProcess = BasicMoELayer<typename Layer::scalar_type, typename Layer::router_type,
                                 typename Layer::balancer_type, typename Layer::dispatcher_type,
                                 typename Layer::expert_type, SingleProcess, typename Layer::shared_expert_type>;

/// What set_sequences is told: nothing; or on each rank its tokens in runs of three (the last
/// shorter), and in one process every rank's runs end to end; or nothing on the ranks, whose
/// tokens are then one sequence each, and in one process each rank's tokens as one sequence.
enum class Sequences { none, runs_of_three, one_per_rank };

/// Each batch rank's tokens (ranks past the list get 3) and their sequences.
struct Shards {
  std::vector<Index> tokens;
  Sequences sequences = Sequences::none;
  Shards(std::initializer_list<Index> tokens) : tokens(tokens) {}
  Shards(std::vector<Index> tokens, Sequences sequences = Sequences::none)
      : tokens(std::move(tokens)), sequences(sequences) {}
};

inline std::vector<Index> runs_of_three(Index tokens) {
  std::vector<Index> lengths;
  for (; tokens > 0; tokens -= 3) lengths.push_back(std::min<Index>(3, tokens));
  return lengths;
}

/// Builds the layer over `layout` and in one process from the same config and policies, runs
/// two training steps on the same batch (split by batch rank as `batch` says), and expects every
/// result within 1e-12 (double) or 1e-5 (float) of the one-process layer's.
template <class Layer, class... Policies>
void expect_same_as_one_process(const Layout& layout, const LayerConfig& config, Shards batch,
                                const Policies&... policies) {
  using T = typename Layer::scalar_type;
  const double limit = std::is_same_v<T, double> ? 1e-12 : 1e-5;
  const int shards = layout.groups.batch.size(), shard = layout.groups.batch.rank();
  std::vector<Index>& tokens = batch.tokens;
  tokens.resize(static_cast<std::size_t>(shards), 3);
  const Index total = std::accumulate(tokens.begin(), tokens.end(), Index{0});
  const Index first = std::accumulate(tokens.begin(), tokens.begin() + shard, Index{0});
  const Index mine = tokens[static_cast<std::size_t>(shard)];

  OneProcess<Layer> one(config, policies...);
  Layer many(config, policies..., ExpertParallel(layout.groups, layout.options));
  Layer expected(config, policies..., ExpertParallel(layout.groups, layout.options));  // slices of one's
  SCOPED_TRACE(layout.name + " " + Layer::name());
  if (batch.sequences != Sequences::none) {
    const bool runs = batch.sequences == Sequences::runs_of_three;
    std::vector<Index> every_rank;
    const auto lengths = [&](Index n) { return runs ? runs_of_three(n) : n > 0 ? std::vector<Index>{n} : std::vector<Index>{}; };
    for (const Index n : tokens)
      for (const Index length : lengths(n)) every_rank.push_back(length);
    one.set_sequences(every_rank);
    if (runs) many.set_sequences(runs_of_three(mine));
  }

  if constexpr (RouterReadsTokenIds<typename Layer::router_type>) {  // ids that repeat, each rank its tokens'
    std::vector<Index> ids(static_cast<std::size_t>(total));
    for (Index t = 0; t < total; ++t) ids[static_cast<std::size_t>(t)] = (t * 5 + 1) % 23;
    one.set_token_ids(ids);
    many.set_token_ids(std::span<const Index>(ids).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(mine)));
  }

  expected.assign_whole(one.parameters());
  double parameters = 0;
  for (std::size_t i = 0; i < many.parameters().size(); ++i)
    parameters = std::max(parameters, relative_error(many.parameters()[i].values(), expected.parameters()[i].values()));
  EXPECT_EQ(worst(parameters), 0.0) << "initial parameters are not the slices of one process's";

  for (int step = 0; step < 2; ++step) {
    const Matrix<T> x = random_matrix<T>(total, config.hidden, 10 + step);
    const Matrix<T> dy = random_matrix<T>(total, config.hidden, 20 + step);
    const Matrix<T> y1 = one.forward(x);
    one.zero_grad();
    const Matrix<T> dx1 = one.backward(dy / T(shards));  // J = (1/D)·Σ_r J_r

    const Matrix<T> y = many.forward(x.middleRows(first, mine));
    many.zero_grad();
    const Matrix<T> dx = many.backward(dy.middleRows(first, mine));
    many.reduce_gradients();

    EXPECT_LE(worst(relative_error(y, y1.middleRows(first, mine).eval())), limit) << "y, step " << step;
    EXPECT_LE(worst(relative_error(dx, (T(shards) * dx1.middleRows(first, mine)).eval())), limit)
        << "dx, step " << step;
    EXPECT_LE(worst(std::abs(double(many.balance_loss()) - double(one.balance_loss())) /
                    std::max(1e-300, std::abs(double(one.balance_loss())))),
              limit)
        << "balance loss, step " << step;
    expected.assign_whole(one.gradients());
    for (std::size_t i = 0; i < many.gradients().size(); ++i)
      EXPECT_LE(worst(relative_error(many.gradients()[i].values(), expected.parameters()[i].values())), limit)
          << many.gradients()[i].name() << ", step " << step;

    one.end_step();
    many.end_step();
    if constexpr (requires { one.balance_state().bias; }) {
      EXPECT_EQ(worst(relative_error(many.balance_state().bias, one.balance_state().bias)), 0.0);
    }
  }
}

constexpr LayerConfig small{.hidden = 6, .ffn = 8, .experts = 8, .seed = 3};

template <class R, class B, class D, class X>
void for_both_scalars(const Shards& tokens, const auto&... policies) {
  for (const auto& layout : layouts()) {
    expect_same_as_one_process<MoELayer<R, B, D, X, ExpertParallel, double>>(layout, small, tokens, policies...);
    expect_same_as_one_process<MoELayer<R, B, D, X, ExpertParallel, float>>(layout, small, tokens, policies...);
  }
}

}  // namespace moekit::test
