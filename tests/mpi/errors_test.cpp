// A failure on one rank ends every rank with that rank's message, and nothing hangs: each test
// runs under a CTest timeout. After an agreed error the layer still works on every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "support.hpp"

namespace moekit::test {
namespace {

using Layer = MoELayer<TopK<2>, ExpertParallel, double>;
constexpr LayerConfig config{.hidden = 4, .ffn = 6, .experts = 8, .seed = 1};

/// 1 where every rank saw `expected` in its error, else 0 (on every rank).
bool everyone_saw(const std::string& message, const std::string& expected) {
  return worst(message.find(expected) == std::string::npos ? 1.0 : 0.0) == 0.0;
}

TEST(ExpertParallelErrors, BadInputOnOneRankFailsEveryRankWithItsMessage) {
  Layer layer(config);
  const int bad = world().size() - 1;
  const Index width = world().rank() == bad ? 5 : 4;
  const auto message = message_of([&] { layer.forward(random_matrix<double>(3, width, 1)); });
  EXPECT_TRUE(everyone_saw(message, "rank " + std::to_string(bad) + " of " + std::to_string(world().size()) +
                                        ": moekit::MoELayer::forward: x is [3,5]; expected [3,4]"))
      << message;

  // Nothing was left half done: the next step works everywhere.
  const Matrix<double> x = random_matrix<double>(3, 4, 2 + world().rank());
  EXPECT_TRUE(everyone_saw(message_of([&] { layer.backward(layer.forward(x)); }), "(no error)"));
}

TEST(ExpertParallelErrors, NonFiniteGradientOnOneRank) {
  Layer layer(config);
  const Matrix<double> x = random_matrix<double>(3, 4, 3);
  layer.forward(x);
  Matrix<double> dy = x;
  if (world().rank() == 0) dy(1, 2) = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(everyone_saw(message_of([&] { layer.backward(dy); }),
                           "rank 0 of " + std::to_string(world().size()) + ": moekit::MoELayer::backward: dy[1,2] is nan"));
}

TEST(ExpertParallelErrors, DifferentLayersOnDifferentRanks) {
  LayerConfig mine = config;
  if (world().rank() == 1) mine.ffn = 7;
  const auto message = message_of([&] { Layer layer(mine); });
  EXPECT_TRUE(everyone_saw(message, "expected the same layer on every rank")) << message;
}

TEST(ExpertParallelErrors, ExpertsNotDivisibleByTheGroup) {
  LayerConfig odd = config;
  odd.experts = 2 * world().size() + 1;
  const auto message = message_of([&] { Layer layer(odd); });
  EXPECT_TRUE(everyone_saw(message, "moekit::ExpertParallel: experts = " + std::to_string(odd.experts) + " over " +
                                        std::to_string(world().size()) + " expert-parallel ranks; expected a multiple of " +
                                        std::to_string(world().size())))
      << message;
}

TEST(ExpertParallelErrors, FfnNotDivisibleByExpertTensorParallel) {
  if (world().size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  LayerConfig odd = config;
  odd.ffn = 7;
  const auto groups = ExpertParallel::groups(world(), ParallelLayout(world().size(), {.ep = world().size() / 2, .etp = 2}));
  const auto message = message_of([&] { Layer layer(odd, ExpertParallel(groups)); });
  EXPECT_TRUE(everyone_saw(message, "ffn = 7 over 2 expert-tensor-parallel ranks; expected a multiple of 2")) << message;
}

TEST(ExpertParallelErrors, ExpertBiasesNeedWholeExperts) {
  if (world().size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  using Biased = MoELayer<TopK<2>, GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>, ExpertParallel, double>;
  const auto groups = ExpertParallel::groups(world(), ParallelLayout(world().size(), {.ep = world().size() / 2, .etp = 2}));
  const auto message = message_of([&] { Biased layer(config, ExpertParallel(groups)); });
  EXPECT_TRUE(everyone_saw(message, "experts with biases and each expert's ffn = 6 split over 2 "
                                    "expert-tensor-parallel ranks; expected etp = 1"))
      << message;
}

TEST(ExpertParallelErrors, HierarchicalNodeSizeMustDivideTheGroup) {
  const auto message = message_of([&] { Layer layer(config, ExpertParallel(ExpertParallel::Options{.ranks_per_node = 3})); });
  if (world().size() % 3 == 0) GTEST_SKIP() << "3 divides the world";
  EXPECT_TRUE(everyone_saw(message, "ranks_per_node = 3 with " + std::to_string(world().size()) +
                                        " expert-parallel ranks; expected 0 (flat) or a divisor"))
      << message;
}

TEST(ExpertParallelErrors, ChunksNeedTheFlatExchange) {
  const auto message = message_of(
      [&] { Layer layer(config, ExpertParallel(ExpertParallel::Options{.ranks_per_node = 1, .chunks = 2})); });
  EXPECT_TRUE(everyone_saw(message, "chunks = 2 with ranks_per_node = 1; expected chunks >= 1, and 1 with a "
                                    "hierarchical exchange"))
      << message;
  const auto zero = message_of([&] { Layer layer(config, ExpertParallel(ExpertParallel::Options{.chunks = 0})); });
  EXPECT_TRUE(everyone_saw(zero, "chunks = 0")) << zero;
}

// The hierarchical exchange delivers exactly what the flat one does, bit for bit, for uneven
// counts with zeros; each row says where it came from and where it went.
TEST(RowExchange, HierarchicalEqualsFlat) {
  const int size = world().size(), me = world().rank();
  if (size < 4) GTEST_SKIP() << "needs 2 nodes of 2 ranks";
  mpi::RowExchange flat(world()), hierarchical(world(), 2);
  ASSERT_TRUE(hierarchical.hierarchical());
  const Index width = 3;
  auto rows_between = [](int from, int to) { return Index((from * 7 + to * 3) % 5); };  // 0…4 rows
  std::vector<Index> send_rows, recv_rows;
  for (int p = 0; p < size; ++p) {
    send_rows.push_back(rows_between(me, p));
    recv_rows.push_back(rows_between(p, me));
  }
  std::vector<double> send;
  for (int p = 0; p < size; ++p)
    for (Index r = 0; r < send_rows[static_cast<std::size_t>(p)]; ++r)
      for (Index c = 0; c < width; ++c) send.push_back(1000.0 * me + 100.0 * p + 10.0 * double(r) + double(c));
  std::vector<double> expected;
  for (int q = 0; q < size; ++q)
    for (Index r = 0; r < recv_rows[static_cast<std::size_t>(q)]; ++r)
      for (Index c = 0; c < width; ++c) expected.push_back(1000.0 * q + 100.0 * me + 10.0 * double(r) + double(c));
  std::vector<double> a(expected.size() + 1, -1), b(expected.size() + 1, -1);
  flat(send.data(), send_rows, a.data(), recv_rows, width);
  hierarchical(send.data(), send_rows, b.data(), recv_rows, width);
  a.pop_back();
  b.pop_back();
  EXPECT_EQ(worst(a == expected ? 0.0 : 1.0), 0.0);
  EXPECT_EQ(worst(b == expected ? 0.0 : 1.0), 0.0);
}

TEST(ExpertParallelErrors, RanksAtDifferentStepsAreNamedNotLeftWaiting) {
  Layer layer(config);
  const Matrix<double> x = random_matrix<double>(3, 4, 5);
  layer.forward(x);
  // Rank 0 goes back through the forward; the others start another forward.
  const auto message = message_of([&] {
    if (world().rank() == 0)
      layer.backward(x);
    else
      layer.forward(x);
  });
  EXPECT_TRUE(everyone_saw(message, "the ranks of a layer are at different steps (rank 0 in backward, rank 1 in forward"))
      << message;
}

TEST(ExpertParallelErrors, ALoadThatFailsOnOneRankFailsOnEveryRankAndChangesNothing) {
  namespace fs = std::filesystem;
  Layer layer(config);
  const auto path = fs::temp_directory_path() / ("moekit_mpi_load_" + std::to_string(world().rank()) + ".safetensors");
  layer.save(path);
  const int bad = world().size() - 1;
  const std::vector<double> before(layer.parameters()[1].values().begin(), layer.parameters()[1].values().end());
  const auto message = message_of([&] { layer.load(world().rank() == bad ? path.string() + ".missing" : path.string()); });
  EXPECT_TRUE(everyone_saw(message, "rank " + std::to_string(bad) + " of " + std::to_string(world().size()) +
                                        ": moekit::SafeTensors: '"))
      << message;
  EXPECT_EQ(worst(std::ranges::equal(before, layer.parameters()[1].values()) ? 0.0 : 1.0), 0.0);
  fs::remove(path);
}

TEST(ExpertParallelErrors, RanksBuiltWithDifferentSeedsAreRefused) {
  LayerConfig mine = config;
  mine.seed = world().rank() == 1 ? 2 : 1;
  const auto message = message_of([&] { Layer layer(mine); });
  EXPECT_TRUE(everyone_saw(message, "moekit::ExpertParallel: after construction, rank 1 holds a router.weight or "
                                    "shared expert different from rank 0's"))
      << message;
}

TEST(ExpertParallelErrors, ARankThatLoadsAnotherRanksSliceIsRefused) {
  namespace fs = std::filesystem;
  Layer layer(config);
  const auto mine = fs::temp_directory_path() / ("moekit_mpi_slice_" + std::to_string(world().rank()) + ".safetensors");
  layer.save(mine);
  world().barrier();
  const int other = (world().rank() + 1) % world().size();
  const auto theirs = fs::temp_directory_path() / ("moekit_mpi_slice_" + std::to_string(other) + ".safetensors");
  const auto message = message_of([&] { layer.load(theirs); });
  EXPECT_TRUE(everyone_saw(message, "' holds the slice of experts [")) << message;
  world().barrier();
  layer.load(mine);  // its own slice loads
  fs::remove(mine);
}

}  // namespace
}  // namespace moekit::test
