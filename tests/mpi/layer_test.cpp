// The layer over ranks computes what one process computes for the whole batch: outputs,
// input gradients, parameter gradients after reduce_gradients(), the balancer's loss and state.
// Run under mpirun with 2 and 4 ranks; each test goes through every layout the world size allows.
#include <gtest/gtest.h>

#include <functional>
#include <numeric>
#include <vector>

#include "support.hpp"

namespace moekit::test {
namespace {

struct Layout {
  std::string name;
  ExpertParallel::Groups groups;
  ExpertParallel::Options options{};
};

/// EP over every rank; EP with a hierarchical all-to-all (2 ranks a node); expert tensor
/// parallel (ETP = 2); expert data parallel (EDP = 2); the exchange in chunks, overlapped.
const std::vector<Layout>& layouts() {
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

std::vector<Index> runs_of_three(Index tokens) {
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

TEST(ExpertParallel, TopK2AuxLossDropless) {
  for_both_scalars<TopK<2>, AuxLoss, Dropless, GroupedGemm>({5, 7, 4, 6});
}

TEST(ExpertParallel, SigmoidTopK4AuxLossDroplessGeLU) {
  for_both_scalars<TopK<4>, AuxLoss, Dropless, GroupedGemmType<GeLU>>(
      {6, 3, 5, 4}, TopK<4>{{.score = ScoreFn::sigmoid, .normalize = true}});
}

TEST(ExpertParallel, SwitchNoBalanceCapacityDropsByWeight) {
  for_both_scalars<Switch, NoBalance, Capacity, GroupedGemm>({9, 4, 7, 5}, Capacity{{.capacity_factor = 0.5}});
}

TEST(ExpertParallel, AuxFreeCapacityByPositionRenormalizedReference) {
  for_both_scalars<TopK<2>, AuxFree, Capacity, PerExpertLoop>(
      {6, 8, 3, 5}, AuxFree{{.rate = 0.05}},
      Capacity{{.capacity_factor = 0.75, .drop = DropPolicy::position, .renormalize = true}});
}

// GShard's random second expert: each token draws by its number in the whole batch, so every
// rank leaves empty the choices one process leaves empty, at both steps.
TEST(ExpertParallel, RandomSecondExpertCapacity) {
  for_both_scalars<TopK<2>, AuxLoss, Capacity, GroupedGemm>({5, 7, 4, 6}, TopK<2>{{.random_second = 0.5, .seed = 4}},
                                                            Capacity{{.capacity_factor = 1.0}});
}

// Each rank's sequences are its own; the loss is the mean over every rank's, as one process
// given all of them computes it; also with a rank of no tokens, and with none set (each rank's
// tokens one sequence). One composition: each new one costs the sanitizer build minutes.
TEST(ExpertParallel, SequenceWiseLossOverEveryRanksSequences) {
  const SeqAuxLoss strong{{.coefficient = 0.1}};
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({5, 7, 4, 6}, Sequences::runs_of_three), strong);
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({6, 0, 8, 4}, Sequences::runs_of_three), strong);
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({5, 7, 4, 6}, Sequences::one_per_rank), strong);
}

// Each token is jittered by its number in the whole batch, so every rank jitters its tokens as one
// process does, at both steps.
TEST(ExpertParallel, SwitchJitterCapacity) {
  for_both_scalars<Switch, NoBalance, Capacity, GroupedGemm>({5, 7, 4, 6}, Switch{{.jitter = 0.1, .seed = 9}},
                                                             Capacity{{.capacity_factor = 1.0}});
}

// Two terms at once, the z-loss's sums the whole batch's as the auxiliary loss's are.
TEST(ExpertParallel, AuxLossAndZLossDropless) {
  for_both_scalars<TopK<2>, Balanced<AuxLoss, ZLoss>, Dropless, GroupedGemm>(
      {5, 3, 6, 4}, Balanced<AuxLoss, ZLoss>{AuxLoss{{.coefficient = 0.5}}, ZLoss{{.coefficient = 0.5}}});
}

TEST(ExpertParallel, SinkhornDroplessReLU) {
  for_both_scalars<TopK<2>, Sinkhorn, Dropless, GroupedGemmType<ReLU>>({7, 5, 6, 4});
}

TEST(ExpertParallel, AuxLossCapacityPaddedTutelFactor) {
  for_both_scalars<TopK<2>, AuxLoss, Capacity, GroupedGemm>({4, 6, 5, 3},
                                                            Capacity{{.capacity_factor = 0, .pad = true}});
}

// A rank with no tokens, and experts that receive none: a batch of one token on one rank.
TEST(ExpertParallel, EmptyRanksAndIdleExperts) {
  for_both_scalars<TopK<2>, AuxLoss, Dropless, GroupedGemm>({0, 1, 0, 0});
  for_both_scalars<TopK<2>, AuxFree, Capacity, GroupedGemm>({1, 0, 0, 2}, Capacity{{.capacity_factor = 1.0}});
}

// Shared experts (DeepSeek's, and Qwen2-MoE's gated one): every rank holds one whole, runs it on
// its own tokens, and its gradients are reduced as the router's (with the router's logit bias in
// the first case, likewise replicated).
TEST(ExpertParallel, SharedExpertsReplicatedAndReduced) {
  LayerConfig config = small;
  config.shared_ffn = 5;
  for (const auto& layout : layouts()) {
    expect_same_as_one_process<MoELayer<TopK<2>, AuxFree, Dropless, GroupedGemm, Shared<>, ExpertParallel, double>>(
        layout, config, {5, 7, 4, 6}, TopK<2>{{.score = ScoreFn::sigmoid, .normalize = true, .logit_bias = true}});
    expect_same_as_one_process<
        MoELayer<TopK<2>, AuxLoss, Dropless, GroupedGemm, Shared<SharedGate::sigmoid>, ExpertParallel, float>>(
        layout, config, {6, 0, 3, 5});
  }
}

// Llama 4's block: top-1 sigmoid weights that scale the experts' input (the rows travel
// scaled), and a shared expert.
TEST(ExpertParallel, WeightsThatScaleTheInput) {
  LayerConfig config = small;
  config.shared_ffn = 4;
  for (const auto& layout : layouts())
    expect_same_as_one_process<MoELayer<TopK<1>, NoBalance, Dropless, GroupedGemm, Shared<>, ExpertParallel, double>>(
        layout, config, {5, 3, 6, 2},
        TopK<1>{{.score = ScoreFn::sigmoid, .normalize = false, .weight_at = WeightAt::input}});
}

// GPT-OSS's block: a bias on the router's logits and on each expert's gate, up and down, its
// clamped SwiGLU. The experts' biases travel with their experts; expert tensor parallel is refused
// (tests/mpi/errors_test.cpp), so those layouts are left out.
TEST(ExpertParallel, ExpertBiases) {
  using Experts = GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>;
  for (const auto& layout : layouts()) {
    if (layout.groups.expert_tensor.size() > 1) continue;
    expect_same_as_one_process<MoELayer<TopK<2>, NoBalance, Dropless, Experts, ExpertParallel, double>>(
        layout, small, {5, 7, 4, 6}, TopK<2>{{.normalize = true, .logit_bias = true}});
    expect_same_as_one_process<MoELayer<TopK<2>, AuxLoss, Capacity, Experts, ExpertParallel, float>>(
        layout, small, {3, 6, 5, 4}, Capacity{{.capacity_factor = 0.75}});
  }
}

}  // namespace
}  // namespace moekit::test
