// The layouts of Megatron-Core's RankGenerator, checked on the 16-rank worked examples.
#include <gtest/gtest.h>

#include <moekit/parallel/grid.hpp>

using namespace moekit;
using Groups = std::vector<std::vector<int>>;

// Example A: W = 16, TP2 CP1 PP2 (DP4) | ETP1 EP4 (EDP2). Rank 5 → tp 1, dp 2, pp 0.
TEST(ParallelLayout, MegatronExampleA) {
  const ParallelLayout layout(16, {.tp = 2, .pp = 2, .ep = 4, .etp = 1});
  const auto& dense = layout.dense();
  EXPECT_EQ(dense.size("dp"), 4);
  EXPECT_EQ(dense.groups("tp"), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(dense.groups("dp"), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
  EXPECT_EQ(dense.groups("pp"), (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  EXPECT_EQ(dense.coordinate(5, "tp"), 1);
  EXPECT_EQ(dense.coordinate(5, "dp"), 2);
  EXPECT_EQ(dense.coordinate(5, "pp"), 0);

  const auto& expert = layout.expert();
  EXPECT_EQ(expert.size("dp"), 2);
  EXPECT_EQ(expert.groups("ep"), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}}));
  EXPECT_EQ(expert.groups("dp"), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(expert.groups("tp").size(), 16u);  // singletons
  EXPECT_EQ(expert.groups("pp"), dense.groups("pp"));
  // EP {0,1,2,3} spans two TP pairs and two DP ranks: that is the folding.
  EXPECT_EQ(expert.group_of(5, "ep"), (std::vector<int>{4, 5, 6, 7}));
}

// Example B: TP2 CP2 PP2 (DP2) | ETP2 EP2 (EDP2).
TEST(ParallelLayout, MegatronExampleB) {
  const ParallelLayout layout(16, {.tp = 2, .cp = 2, .pp = 2, .ep = 2, .etp = 2});
  const auto& dense = layout.dense();
  EXPECT_EQ(dense.groups("cp"), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(dense.groups("dp"), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(dense.groups("cp-dp"), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
  const auto& expert = layout.expert();
  EXPECT_EQ(expert.groups("tp"), dense.groups("tp"));
  EXPECT_EQ(expert.groups("ep"), dense.groups("cp"));
  EXPECT_EQ(expert.groups("dp"), dense.groups("dp"));
}

// Example C: the same dense grid, ETP1 EP8 (EDP1): EP = 8 > DP·CP = 4, which only folding allows.
TEST(ParallelLayout, MegatronExampleC) {
  const ParallelLayout layout(16, {.tp = 2, .cp = 2, .pp = 2, .ep = 8, .etp = 1});
  EXPECT_EQ(layout.expert().groups("ep"), (Groups{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}}));
  EXPECT_EQ(layout.expert().size("dp"), 1);
}

// megatron-core.md §2.10: TP2 CP2 DP4 | ETP1 EP8 EDP2.
TEST(ParallelLayout, MegatronTp2Cp2Dp4) {
  const ParallelLayout layout(16, {.tp = 2, .cp = 2, .ep = 8, .etp = 1});
  EXPECT_EQ(layout.dense().groups("dp"), (Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
  EXPECT_EQ(layout.expert().groups("ep"), (Groups{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}}));
  EXPECT_EQ(layout.expert().groups("dp"), (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
}

TEST(ParallelLayout, EtpDefaultsToTp) {
  const ParallelLayout layout(8, {.tp = 2, .ep = 2});
  EXPECT_EQ(layout.expert().size("tp"), 2);
  EXPECT_EQ(layout.expert().size("dp"), 2);
}

TEST(ParallelLayout, EveryRankIsInExactlyOneGroupOfEachKind) {
  const ParallelLayout layout(24, {.tp = 2, .pp = 3, .ep = 2, .etp = 1});
  for (const auto* grid : {&layout.dense(), &layout.expert()})
    for (std::string_view mask : {"tp", "cp", "ep", "dp", "pp", "tp-ep", "ep-dp", "tp-ep-dp"}) {
      std::vector<int> seen(24, 0);
      for (const auto& group : grid->groups(mask))
        for (int r : group) ++seen[static_cast<std::size_t>(r)];
      EXPECT_EQ(seen, std::vector<int>(24, 1)) << mask;
    }
}

TEST(ParallelLayout, BadSizesAndOrdersAreNamed) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  {
    EXPECT_NE(message([] { ParallelLayout(12, {.tp = 2, .ep = 4}); }).find("12 ranks are not divisible by etp·ep·pp = 8"),
              std::string::npos);
    EXPECT_NE(message([] { ParallelLayout(6, {.tp = 4}); }).find("6 ranks are not divisible by tp·cp·pp = 4"),
              std::string::npos);
    EXPECT_NE(message([] { ParallelLayout(8, {.ep = 2}, "tp-xp-dp"); }).find("names 'xp'"), std::string::npos);
    EXPECT_NE(message([] { ParallelLayout(8, {.ep = 2}, "tp-dp-pp"); }).find("ep = 2 but the order 'tp-dp-pp' does not name it"),
              std::string::npos);
    EXPECT_NE(message([] { ParallelLayout(8, {.pp = 2, .ep = 2}, "tp-cp-ep-pp-dp"); }).find("different pipeline groups"),
              std::string::npos);
  }
}
