// Every policy the project ships, with the options that change its behaviour, through the law
// suites of its kind. A new policy is one line in one of these lists.
#include <array>

#include <moekit/moekit.hpp>

#include "balancer_laws.hpp"
#include "dispatcher_laws.hpp"
#include "expert_laws.hpp"
#include "router_laws.hpp"

namespace moekit::laws {
namespace {

struct QwenTopK {  // softmax, not normalised
  static constexpr std::string_view label = "QwenTopK";
  static TopK<2> make() { return {{.normalize = false}}; }
};
struct DeepSeekTopK {  // sigmoid, normalised, scaled
  static constexpr std::string_view label = "DeepSeekTopK";
  static TopK<4> make() { return {{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5}}; }
};
struct SigmoidSwitch {
  static constexpr std::string_view label = "SigmoidSwitch";
  static TopK<1> make() { return {{.score = ScoreFn::sigmoid}}; }
};
struct DeepSeekV3Groups {  // sigmoid, 4 groups scored by their top two, 2 kept, normalised, × 2.5
  static constexpr std::string_view label = "DeepSeekV3Groups";
  static constexpr std::array<Index, 2> experts{16, 32};
  static TopK<4> make() {
    return {{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5, .groups = 4, .groups_kept = 2}};
  }
};
struct GShardTopK {  // the second expert kept at random (drawn: the laws hold it in training)
  static constexpr std::string_view label = "GShardTopK";
  static TopK<2> make() { return {{.random_second = 0.5, .seed = 3}}; }
};
struct DeepSeekV2Groups {  // softmax, 4 groups scored by their best, 3 kept
  static constexpr std::string_view label = "DeepSeekV2Groups";
  static constexpr std::array<Index, 2> experts{8, 24};
  static TopK<3> make() { return {{.normalize = false, .groups = 4, .groups_kept = 3, .group_score = GroupScore::max}}; }
};
struct SinkhornAtEvaluation {
  static constexpr std::string_view label = "SinkhornAtEvaluation";
  static constexpr bool training = false;
  static Sinkhorn make() { return {}; }
};
struct DroppingCapacity {
  static constexpr std::string_view label = "DroppingCapacity";
  static Capacity make() { return {{.capacity_factor = 0.5}}; }
};
struct PaddedByPosition {
  static constexpr std::string_view label = "PaddedByPosition";
  static Capacity make() { return {{.capacity_factor = 0.75, .drop = DropPolicy::position, .pad = true}}; }
};
struct LargestCount {  // Tutel's capacity_factor = 0
  static constexpr std::string_view label = "LargestCount";
  static Capacity make() { return {{.capacity_factor = 0}}; }
};
struct Renormalized {  // DeepSpeed's
  static constexpr std::string_view label = "Renormalized";
  static Capacity make() { return {{.capacity_factor = 0.5, .min_capacity = 1, .renormalize = true}}; }
};
struct SmallTiles {  // every block cut into several tiles
  static constexpr std::string_view label = "SmallTiles";
  static GroupedGemm make() { return {{.row_tile = 2, .column_tile = 3}}; }
};
using GptOssExperts = GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>;
struct BiasedSmallTiles {  // the biases' gradients summed by the first of several column tiles
  static constexpr std::string_view label = "BiasedSmallTiles";
  static GptOssExperts make() { return {{.row_tile = 2, .column_tile = 3}}; }
};

using Bf16Experts = GroupedGemmType<SwiGLU, ExpertBias::none, Precision::bf16>;
struct Bf16SmallTiles {  // every block cut into several tiles, its products in bf16
  static constexpr std::string_view label = "Bf16SmallTiles";
  static GroupedGemmType<ClampedSwiGLU, ExpertBias::projections, Precision::bf16> make() {
    return {{.row_tile = 5, .column_tile = 7}};
  }
};

using Int8Experts = GroupedGemmType<SwiGLU, ExpertBias::none, Precision::int8>;
struct Int8SmallTiles {  // every block cut into several tiles (columns rounded to whole panels), biased
  static constexpr std::string_view label = "Int8SmallTiles";
  static GroupedGemmType<ClampedSwiGLU, ExpertBias::projections, Precision::int8> make() {
    return {{.row_tile = 5, .column_tile = 7}};
  }
};

struct BalancedHashTable {  // the hash layers paper's balanced assignment of 1000 ids of Zipf counts
  static constexpr std::string_view label = "BalancedHashTable";
  static Hash make() {
    std::vector<double> counts(1000);
    for (std::size_t id = 0; id < counts.size(); ++id) counts[id] = 1.0 / double(id + 1);
    return {{.table = Hash::balanced_table(counts, 8)}};
  }
  static constexpr std::array<Index, 1> experts{8};
};

struct ExpertChoiceCf2 {  // the paper's default: on average two experts per token
  static constexpr std::string_view label = "ExpertChoiceCf2";
  static constexpr std::array<Index, 3> experts{1, 3, 8};
  static ExpertChoice make() { return {}; }
};
struct ExpertChoiceCf05 {  // fewer slots than tokens: most tokens get no expert
  static constexpr std::string_view label = "ExpertChoiceCf05";
  static constexpr std::array<Index, 2> experts{4, 16};
  static ExpertChoice make() { return {{.capacity_factor = 0.5}}; }
};

using Routers =
    ::testing::Types<TopK<1>, TopK<2>, TopK<4>, QwenTopK, DeepSeekTopK, SigmoidSwitch, DeepSeekV3Groups, DeepSeekV2Groups,
                     GShardTopK, Hash, BalancedHashTable, ExpertChoiceCf2, ExpertChoiceCf05>;
INSTANTIATE_TYPED_TEST_SUITE_P(Moekit, RouterLaws, Routers, CaseName);

using Balancers = ::testing::Types<AuxLoss, AuxFree, Sinkhorn, SinkhornAtEvaluation, ZLoss, NoBalance,
                                   SeqAuxLoss, Balanced<AuxLoss, ZLoss>, Balanced<AuxFree, SeqAuxLoss>,
                                   ImportanceLoss, LoadLoss>;
INSTANTIATE_TYPED_TEST_SUITE_P(Moekit, BalancerLaws, Balancers, CaseName);

using Dispatchers = ::testing::Types<Dropless, Capacity, DroppingCapacity, PaddedByPosition, LargestCount, Renormalized>;
INSTANTIATE_TYPED_TEST_SUITE_P(Moekit, DispatcherLaws, Dispatchers, CaseName);

using Experts = ::testing::Types<GroupedGemm, GroupedGemmType<GeLU>, GroupedGemmType<ReLU>,
                                 GroupedGemmType<ClampedSwiGLU>, SmallTiles, GptOssExperts, BiasedSmallTiles,
                                 GroupedGemmType<ReLU, ExpertBias::projections>, PerExpertLoop,
                                 PerExpertLoopType<GeLU>, PerExpertLoopType<ReLU>, PerExpertLoopType<ClampedSwiGLU>,
                                 PerExpertLoopType<ClampedSwiGLU, ExpertBias::projections>,
                                 PerExpertLoopType<ReLU, ExpertBias::projections>, Bf16Experts,
                                 GroupedGemmType<GeLU, ExpertBias::none, Precision::bf16>, Bf16SmallTiles,
                                 Int8Experts, GroupedGemmType<ReLU, ExpertBias::none, Precision::int8>,
                                 Int8SmallTiles>;
INSTANTIATE_TYPED_TEST_SUITE_P(Moekit, ExpertLaws, Experts, CaseName);

}  // namespace
}  // namespace moekit::laws
