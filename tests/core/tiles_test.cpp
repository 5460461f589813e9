// The experts' tiles: each output element in exactly one tile, within the tile sizes, the largest
// first (a product over the rows) or in memory order (a weight gradient); and for_each_tile runs
// every tile once on any number of threads.
#include <gtest/gtest.h>
#include <tbb/global_control.h>
#include <tbb/task_arena.h>

#include <atomic>
#include <map>
#include <tuple>
#include <vector>

#include <moekit/core/detail/tiles.hpp>

namespace moekit::test {
namespace {

using detail::Tile;

// Five experts: 300 rows (a block of 256 and one of 44), none, 1, 256 and 700.
const std::vector<Index> offsets{0, 300, 300, 301, 557, 1257};

/// How many tiles cover each (expert, row, column) of each expert's `rows(e)` × columns.
std::map<std::tuple<Index, Index, Index>, int> coverage(const std::vector<Tile>& tiles) {
  std::map<std::tuple<Index, Index, Index>, int> covered;
  for (const Tile& t : tiles)
    for (Index r = t.row; r < t.row + t.rows; ++r)
      for (Index c = t.column; c < t.column + t.columns; ++c) ++covered[{t.expert, r, c}];
  return covered;
}

TEST(RowTiles, CoverEachExpertsRowsAndColumnsOnceWithinTheTileSizes) {
  std::vector<Tile> tiles;
  detail::row_tiles(offsets, 256, 300, 128, tiles);
  for (const Tile& t : tiles) {
    EXPECT_GE(t.rows, 1);
    EXPECT_LE(t.rows, 256);
    EXPECT_GE(t.columns, 1);
    EXPECT_LE(t.columns, 128);
  }
  const auto covered = coverage(tiles);
  std::size_t elements = 0;
  for (Index e = 0; e + 1 < Index(offsets.size()); ++e)
    for (Index r = offsets[std::size_t(e)]; r < offsets[std::size_t(e) + 1]; ++r)
      for (Index c = 0; c < 300; ++c) {
        const auto it = covered.find({e, r, c});
        ASSERT_NE(it, covered.end()) << "expert " << e << ", row " << r << ", column " << c;
        EXPECT_EQ(it->second, 1) << "expert " << e << ", row " << r << ", column " << c;
        ++elements;
      }
  EXPECT_EQ(covered.size(), elements);  // nothing outside the experts' blocks
}

TEST(RowTiles, ComeTheLargestFirstAndTiesInTheOrderOfExpertRowAndColumn) {
  std::vector<Tile> tiles;
  detail::row_tiles(offsets, 256, 300, 128, tiles);
  ASSERT_GT(tiles.size(), 2u);
  EXPECT_EQ(tiles.front().rows * tiles.front().columns, 256 * 128);
  EXPECT_EQ(tiles.back().rows * tiles.back().columns, 1 * 44);  // expert 2's one row, the last columns
  for (std::size_t i = 1; i < tiles.size(); ++i) {
    const Tile &a = tiles[i - 1], &b = tiles[i];
    const Index work_a = a.rows * a.columns, work_b = b.rows * b.columns;
    EXPECT_GE(work_a, work_b) << "tile " << i;
    if (work_a == work_b) {
      EXPECT_LT(std::tie(a.expert, a.row, a.column), std::tie(b.expert, b.row, b.column)) << "tile " << i;
    }
  }
}

TEST(WeightGradientTiles, CoverEachGradientOfAnExpertWithRowsOnceInTheExpertsOrder) {
  std::vector<Tile> tiles;
  detail::weight_gradient_tiles(offsets, 100, 70, 64, tiles);
  const auto covered = coverage(tiles);
  for (Index e = 0; e + 1 < Index(offsets.size()); ++e) {
    const bool has_rows = offsets[std::size_t(e) + 1] > offsets[std::size_t(e)];
    for (Index r = 0; r < 100; ++r)
      for (Index c = 0; c < 70; ++c) {
        const auto it = covered.find({e, r, c});
        EXPECT_EQ(it == covered.end() ? 0 : it->second, has_rows ? 1 : 0) << "expert " << e << ", " << r << ", " << c;
      }
  }
  EXPECT_EQ(covered.size(), std::size_t(4 * 100 * 70));
  for (const Tile& t : tiles) {
    EXPECT_LE(t.rows, 64);
    EXPECT_LE(t.columns, 64);
  }
  // As the gradients lie in memory: by expert, then row, then column.
  for (std::size_t i = 1; i < tiles.size(); ++i) {
    const Tile &a = tiles[i - 1], &b = tiles[i];
    EXPECT_LT(std::tie(a.expert, a.row, a.column), std::tie(b.expert, b.row, b.column)) << "tile " << i;
  }
}

TEST(ForEachTile, RunsEveryTileOnceOnAnyNumberOfThreads) {
  std::vector<Tile> tiles;
  detail::row_tiles(offsets, 16, 40, 8, tiles);
  for (const int threads : {1, 3, 8}) {
    const tbb::global_control limit(tbb::global_control::max_allowed_parallelism, std::size_t(threads));
    tbb::task_arena arena(threads);
    std::vector<std::atomic<int>> runs(tiles.size());
    arena.execute([&] {
      detail::for_each_tile(tiles, [&](const Tile& t) { ++runs[std::size_t(&t - tiles.data())]; });
    });
    for (std::size_t i = 0; i < tiles.size(); ++i) EXPECT_EQ(runs[i].load(), 1) << threads << " threads, tile " << i;
  }
  int none = 0;
  detail::for_each_tile({}, [&](const Tile&) { ++none; });
  EXPECT_EQ(none, 0);
}

}  // namespace
}  // namespace moekit::test
