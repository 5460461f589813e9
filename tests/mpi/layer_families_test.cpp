// The layer over ranks computes what one process computes for the whole batch: balancing terms
// per sequence and several at once, noisy gating with Shazeer's losses, hash routing, Expert Choice,
// Sinkhorn, and the model families' blocks (shared experts,
// weights on the input, expert biases). Run under mpirun with 2 and 4 ranks.
#include "one_process.hpp"

namespace moekit::test {
namespace {

// Each rank's sequences are its own; the loss is the mean over every rank's, as one process
// given all of them computes it; also with a rank of no tokens, and with none set (each rank's
// tokens one sequence). One composition: each new one costs the sanitizer build minutes.
TEST(ExpertParallel, SequenceWiseLossOverEveryRanksSequences) {
  const SeqAuxLoss strong{{.coefficient = 0.1}};
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({5, 7, 4, 6}, Sequences::runs_of_three), strong);
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({6, 0, 8, 4}, Sequences::runs_of_three), strong);
  for_both_scalars<TopK<2>, SeqAuxLoss, Dropless, GroupedGemm>(Shards({5, 7, 4, 6}, Sequences::one_per_rank), strong);
}

// Two terms at once, the z-loss's sums the whole batch's as the auxiliary loss's are.
TEST(ExpertParallel, AuxLossAndZLossDropless) {
  for_both_scalars<TopK<2>, Balanced<AuxLoss, ZLoss>, Dropless, GroupedGemm>(
      {5, 3, 6, 4}, Balanced<AuxLoss, ZLoss>{AuxLoss{{.coefficient = 0.5}}, ZLoss{{.coefficient = 0.5}}});
}

// Shazeer's noisy gating and its two losses: each token's noise drawn by its number in the whole
// batch, the importance and load the whole batch's.
TEST(ExpertParallel, NoisyGatingWithImportanceAndLoadLosses) {
  using Shazeer = Balanced<ImportanceLoss, LoadLoss>;
  for_both_scalars<TopK<2>, Shazeer, Dropless, GroupedGemm>(
      {5, 7, 4, 6}, TopK<2>{{.normalize = true, .noisy_gating = true, .seed = 4}},
      Shazeer{ImportanceLoss{{.coefficient = 0.5}}, LoadLoss{{.coefficient = 0.5}}});
}

// Hash routing: each rank tells its layer its own tokens' ids; a layer with no router tensors
// (nothing replicated to reduce), with Capacity planning the whole batch group's choices.
TEST(ExpertParallel, HashRoutingByTokenIds) {
  for_both_scalars<Hash, NoBalance, Dropless, GroupedGemm>({5, 0, 7, 4}, Hash{{.seed = 2}});
  for_both_scalars<Hash, NoBalance, Capacity, GroupedGemm>({6, 3, 5, 4}, Hash{{.seed = 2}},
                                                         Capacity{{.capacity_factor = 0.75}});
}

// Expert Choice: each expert takes its C tokens of the whole batch group, from whichever ranks
// hold them (here also with a rank of no tokens); and with the z-loss beside it.
TEST(ExpertParallel, ExpertChoiceOverTheWholeBatch) {
  for_both_scalars<ExpertChoice, NoBalance, Dropless, GroupedGemm>({5, 0, 7, 4});
  for_both_scalars<ExpertChoice, ZLoss, Dropless, GroupedGemm>({6, 3, 5, 4}, ExpertChoice{{.capacity_factor = 1.5}});
}

TEST(ExpertParallel, SinkhornDroplessReLU) {
  for_both_scalars<TopK<2>, Sinkhorn, Dropless, GroupedGemmType<ReLU>>({7, 5, 6, 4});
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
