#pragma once
// How the layer cuts its work for TBB. Every cut depends only on the sizes, never on the
// thread count, and each output element belongs to exactly one piece that computes its whole
// sum: results are the same bit for bit on 1 thread or 64.
#include <algorithm>
#include <cstddef>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/core/tensor.hpp>

namespace moekit::detail {

/// body(first, count) for the blocks [first, first + count) of at most `size` that cover [0, n),
/// in parallel.
template <class Body>
void for_each_block(Index n, Index size, Body body) {
  const Index blocks = (n + size - 1) / size;
  tbb::parallel_for(tbb::blocked_range<Index>(0, blocks, 1), [&](const tbb::blocked_range<Index>& r) {
    for (Index b = r.begin(); b != r.end(); ++b) body(b * size, std::min(size, n - b * size));
  });
}

/// A unit of parallel work on one expert: rows [row, row + rows) × columns [column, column + columns)
/// of an output.
struct Tile {
  Index expert, row, rows, column, columns;
};

/// Cuts, for each expert e, its rows [first, first + count) = row_range(e) into blocks of at most
/// `row_size` and the columns [0, columns) into blocks of at most `column_size`.
template <class RowRange>
void make_tiles(Index experts, RowRange row_range, Index row_size, Index columns, Index column_size,
                std::vector<Tile>& tiles) {
  tiles.clear();
  for (Index e = 0; e < experts; ++e) {
    const auto [first, count] = row_range(e);
    for (Index r = 0; r < count; r += row_size)
      for (Index c = 0; c < columns; c += column_size)
        tiles.push_back({e, first + r, std::min(row_size, count - r), c, std::min(column_size, columns - c)});
  }
}

template <class Body>
void for_each_tile(const std::vector<Tile>& tiles, Body body) {
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, tiles.size(), 1),
                    [&](const tbb::blocked_range<std::size_t>& r) {
                      for (std::size_t i = r.begin(); i != r.end(); ++i) body(tiles[i]);
                    });
}

}  // namespace moekit::detail
