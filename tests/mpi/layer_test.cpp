// The layer over ranks computes what one process computes for the whole batch: the routers,
// balancers and dispatchers. Run under mpirun with 2 and 4 ranks, also with the sanitizers;
// layer_families_test.cpp checks the rest the same way.
#include "one_process.hpp"

namespace moekit::test {
namespace {

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

// Each token is jittered by its number in the whole batch, so every rank jitters its tokens as one
// process does, at both steps.
TEST(ExpertParallel, SwitchJitterCapacity) {
  for_both_scalars<Switch, NoBalance, Capacity, GroupedGemm>({5, 7, 4, 6}, Switch{{.jitter = 0.1, .seed = 9}},
                                                             Capacity{{.capacity_factor = 1.0}});
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

}  // namespace
}  // namespace moekit::test
