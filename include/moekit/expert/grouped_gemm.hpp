#pragma once
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/core/concepts.hpp>
#include <moekit/core/detail/gemm.hpp>
#include <moekit/core/error.hpp>
#include <moekit/expert/activation.hpp>

namespace moekit {

namespace detail {

/// A unit of parallel work: rows (or FFN columns) [begin, end) of one expert.
struct Tile {
  Index expert, begin, end;
};

/// Cuts each expert's range [0, extent(e)) into pieces of at most `size`. The cut depends only
/// on the sizes, never on the thread count, so every sum is taken in the same order: results
/// are the same bit for bit on 1 thread or 64.
template <class Extent>
void make_tiles(Index experts, Index size, Extent extent, std::vector<Tile>& tiles) {
  tiles.clear();
  for (Index e = 0; e < experts; ++e)
    for (Index begin = 0, end = extent(e); begin < end; begin += size)
      tiles.push_back({e, begin, std::min(begin + size, end)});
}

template <class Body>
void for_each_tile(const std::vector<Tile>& tiles, Body body) {
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, tiles.size()),
                    [&](const tbb::blocked_range<std::size_t>& r) {
                      for (std::size_t i = r.begin(); i != r.end(); ++i) body(tiles[i]);
                    });
}

}  // namespace detail

/// FFN experts computed as GEMMs over each expert's contiguous block of rows, in TBB tiles.
/// docs/policies/expert.md#groupedgemm
///
/// Forward tiles are (expert, block of rows); the weight gradients are tiled by (expert, block
/// of FFN columns), so each tile owns its slice of the gradient and reduces over the expert's
/// rows in a fixed order.
template <Activation Act>
struct GroupedGemmType {
  using policy_kind = expert_kind;
  using activation = Act;
  static constexpr std::string_view name = "GroupedGemm";

  struct Options {
    Index row_tile = 64;      // rows per forward / input-gradient tile
    Index column_tile = 128;  // FFN columns per weight-gradient tile
  };
  Options options{};

  /// What forward keeps for backward. Backward overwrites it with its gradients (gate and up
  /// become d_gate and d_up, hidden a scratch), so no [S,F] buffer is added for the backward.
  template <Scalar T>
  struct Saved {
    detail::Buffer<T> gate, up, hidden;  // [S,F] gate·x, up·x, and act(gate·x) ⊙ up·x (or act(up·x))
    std::vector<detail::Tile> tiles;
    detail::GemmWorkspace<T> gemm;
  };

  static std::vector<ParameterSpec> parameters(const LayerShape& s, Index local_experts) {
    return detail::ffn_parameters<Act>(s, local_experts);
  }

  void validate(const LayerShape&) const {
    detail::require(options.row_tile >= 1 && options.column_tile >= 1,
                    "moekit::GroupedGemm: row_tile = ", options.row_tile,
                    ", column_tile = ", options.column_tile, "; expected both >= 1");
  }

  /// rows [S,H] in per-expert blocks (offsets [E+1]) → out [S,H].
  template <Scalar T>
  void forward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows,
               std::span<const Index> offsets, MatrixRef<T> out, Saved<T>& saved) const {
    using Slot = detail::FfnSlots<Act>;
    const Index count = rows.rows(), ffn = weights[Slot::up].shape()[1];
    auto gate = saved.gate.matrix(Act::gated ? count : 0, ffn);
    auto up = saved.up.matrix(count, ffn);
    auto hidden = saved.hidden.matrix(count, ffn);
    saved.gemm.ready();
    row_tiles(offsets, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const Index n = tile.end - tile.begin;
      const auto x = rows.middleRows(tile.begin, n);
      auto u = up.middleRows(tile.begin, n);
      auto h = hidden.middleRows(tile.begin, n);
      detail::gemm(saved.gemm, u, x, weights[Slot::up].slice(tile.expert).transpose());
      if constexpr (Act::gated) {
        auto g = gate.middleRows(tile.begin, n);
        detail::gemm(saved.gemm, g, x, weights[Slot::gate].slice(tile.expert).transpose());
        h = g.unaryExpr([](T v) { return Act::apply(v); }).cwiseProduct(u);
      } else {
        h = u.unaryExpr([](T v) { return Act::apply(v); });
      }
      detail::gemm(saved.gemm, out.middleRows(tile.begin, n), h, weights[Slot::down].slice(tile.expert).transpose());
    });
    saved.gemm.ready();  // every thread now has room for every product of this step
  }

  /// d_out [S,H] → d_rows [S,H]; adds the weight gradients into grads. Consumes `saved`.
  template <Scalar T>
  void backward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows,
                std::span<const Index> offsets, Saved<T>& saved, ConstMatrixRef<T> d_out,
                MatrixRef<T> d_rows, std::span<Tensor<T>> grads) const {
    using Slot = detail::FfnSlots<Act>;
    const Index count = rows.rows(), ffn = weights[Slot::up].shape()[1];
    auto gate = saved.gate.matrix(Act::gated ? count : 0, ffn);
    auto up = saved.up.matrix(count, ffn);
    auto hidden = saved.hidden.matrix(count, ffn);

    saved.gemm.ready();
    // d_down = d_outᵀ · hidden, before hidden's buffer is reused below.
    column_tiles(offsets, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const auto [first, n] = block_of(offsets, tile.expert);
      detail::gemm_add(saved.gemm, grads[Slot::down].slice(tile.expert).middleCols(tile.begin, tile.end - tile.begin),
                       d_out.middleRows(first, n).transpose(), hidden.block(first, tile.begin, n, tile.end - tile.begin));
    });

    // d_hidden = d_out · down, then through the activation: gate ← d_gate and up ← d_up in place.
    row_tiles(offsets, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const Index n = tile.end - tile.begin;
      auto d_hidden = hidden.middleRows(tile.begin, n);
      detail::gemm(saved.gemm, d_hidden, d_out.middleRows(tile.begin, n), weights[Slot::down].slice(tile.expert));
      auto u = up.middleRows(tile.begin, n);
      auto dx = d_rows.middleRows(tile.begin, n);
      if constexpr (Act::gated) {
        auto g = gate.middleRows(tile.begin, n);
        for (Index i = 0; i < n; ++i)
          for (Index j = 0; j < ffn; ++j) {  // both outputs read both inputs: one pass, by element
            const T gv = g(i, j), uv = u(i, j), dh = d_hidden(i, j);
            g(i, j) = dh * uv * Act::derivative(gv);
            u(i, j) = dh * Act::apply(gv);
          }
        detail::gemm(saved.gemm, dx, g, weights[Slot::gate].slice(tile.expert));
        detail::gemm_add(saved.gemm, dx, u, weights[Slot::up].slice(tile.expert));
      } else {
        u = d_hidden.cwiseProduct(u.unaryExpr([](T v) { return Act::derivative(v); }));
        detail::gemm(saved.gemm, dx, u, weights[Slot::up].slice(tile.expert));
      }
    });

    // d_up = d_upᵀ · x and d_gate likewise, each tile owning a block of F columns.
    column_tiles(offsets, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const auto [first, n] = block_of(offsets, tile.expert);
      const Index width = tile.end - tile.begin;
      const auto x = rows.middleRows(first, n);
      detail::gemm_add(saved.gemm, grads[Slot::up].slice(tile.expert).middleRows(tile.begin, width),
                       up.block(first, tile.begin, n, width).transpose(), x);
      if constexpr (Act::gated)
        detail::gemm_add(saved.gemm, grads[Slot::gate].slice(tile.expert).middleRows(tile.begin, width),
                         gate.block(first, tile.begin, n, width).transpose(), x);
    });
    saved.gemm.ready();  // every thread now has room for every product of this step
  }

 private:
  void row_tiles(std::span<const Index> offsets, std::vector<detail::Tile>& tiles) const {
    const Index experts = static_cast<Index>(offsets.size()) - 1;
    detail::make_tiles(experts, options.row_tile, [&](Index e) {
      return offsets[static_cast<std::size_t>(e) + 1] - offsets[static_cast<std::size_t>(e)];
    }, tiles);
    for (auto& tile : tiles) {  // block-relative → absolute row numbers
      tile.begin += offsets[static_cast<std::size_t>(tile.expert)];
      tile.end += offsets[static_cast<std::size_t>(tile.expert)];
    }
  }
  /// Tiles of F columns for the experts that have rows.
  void column_tiles(std::span<const Index> offsets, Index ffn, std::vector<detail::Tile>& tiles) const {
    const Index experts = static_cast<Index>(offsets.size()) - 1;
    detail::make_tiles(experts, options.column_tile, [&](Index e) {
      return block_of(offsets, e).second == 0 ? 0 : ffn;
    }, tiles);
  }
  /// Expert e's block of rows: (first row, row count).
  static std::pair<Index, Index> block_of(std::span<const Index> offsets, Index e) {
    const auto i = static_cast<std::size_t>(e);
    return {offsets[i], offsets[i + 1] - offsets[i]};
  }
};

/// SwiGLU experts, the default.
using GroupedGemm = GroupedGemmType<SwiGLU>;

static_assert(Expert<GroupedGemm>);

}  // namespace moekit
