#pragma once
// How the layer and its policies cut their work for threads (threads.hpp). Every cut depends
// only on the sizes, never on the thread count, and each output element belongs to exactly one
// piece that computes its whole sum, or sums the pieces' shares in a fixed order: results are the
// same bit for bit on 1 thread or 64.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include <moekit/core/detail/threads.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit::detail {

/// body(first, count) for the blocks [first, first + count) of at most `size` that cover [0, n),
/// in parallel.
template <class Body>
void for_each_block(Index n, Index size, Body body) {
  const auto block = [&](Index b) { body(b * size, std::min(size, n - b * size)); };
  parallel_for_blocks((n + size - 1) / size, block);
}

/// body(i) for each i of [0, n), by blocks of at most `size` in parallel; each i writes only
/// what is its own (its row).
template <class Body>
void for_each_index(Index n, Index size, Body body) {
  for_each_block(n, size, [&](Index first, Index count) {
    for (Index i = first; i < first + count; ++i) body(i);
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

/// Expert e's block of dispatched rows, from the offsets [E+1] of the experts' blocks: (first row,
/// row count).
inline std::pair<Index, Index> block_of(std::span<const Index> offsets, Index e) {
  const auto i = static_cast<std::size_t>(e);
  return {offsets[i], offsets[i + 1] - offsets[i]};
}

/// Tiles of a product over the dispatched rows (offsets [E+1]) into `columns` output columns:
/// (expert, at most row_size of its rows, at most column_size columns), the most rows × columns
/// first, ties in the order made (the experts', then rows, then columns), so that for_each_tile
/// hands the smallest out last and the threads finish together (docs/kernels.md#tile-schedule).
inline void row_tiles(std::span<const Index> offsets, Index row_size, Index columns, Index column_size,
                      std::vector<Tile>& tiles) {
  make_tiles(static_cast<Index>(offsets.size()) - 1, [&](Index e) { return block_of(offsets, e); }, row_size,
             columns, column_size, tiles);
  std::sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) {
    return std::tuple(-a.rows * a.columns, a.expert, a.row, a.column) <
           std::tuple(-b.rows * b.columns, b.expert, b.row, b.column);
  });
}

/// Tiles of the [rows, columns] weight gradients of the experts that have rows (offsets [E+1]),
/// at most size × size; each tile sums over all of its expert's rows. In the experts' order, as
/// the gradients lie in memory: ordered by work instead they ran slower, and with a dozen tiles or
/// more a thread the order hardly moves the balance (docs/kernels.md#tile-schedule).
inline void weight_gradient_tiles(std::span<const Index> offsets, Index rows, Index columns, Index size,
                                  std::vector<Tile>& tiles) {
  make_tiles(static_cast<Index>(offsets.size()) - 1,
             [&](Index e) { return std::pair{Index{0}, block_of(offsets, e).second == 0 ? 0 : rows}; }, size, columns,
             size, tiles);
}

/// body(tile) for each tile, in parallel. Threads take the tiles in the list's order, in runs: a
/// quarter of a thread's share of the tiles left, at least one (guided self-scheduling). Early
/// runs are long, so a thread works through neighbouring tiles, which share an operand; the last tiles,
/// the smallest where the list has the largest first, go one at a time, so the threads finish
/// close together. Which thread computes a tile never changes a bit.
template <class Body>
void for_each_tile(const std::vector<Tile>& tiles, Body body) {
  const std::size_t count = tiles.size();
  const auto threads = std::min(count, static_cast<std::size_t>(max_threads()));
  std::atomic<std::size_t> next{0};
  // Claims the next run: its first tile in `first`, its length returned (0 once none is left).
  const auto claim = [&](std::size_t& first) {
    first = next.load(std::memory_order_relaxed);
    std::size_t run = 0;
    do {
      if (first >= count) return std::size_t{0};
      run = std::max<std::size_t>(1, (count - first) / (4 * threads));
    } while (!next.compare_exchange_weak(first, first + run, std::memory_order_relaxed));
    return run;
  };
  const auto runner = [&] {
    std::size_t first = 0;
    for (std::size_t run; (run = claim(first)) != 0;)
      for (std::size_t i = first; i != first + run; ++i) body(tiles[i]);
  };
  parallel_runners(threads, runner);
}

}  // namespace moekit::detail
