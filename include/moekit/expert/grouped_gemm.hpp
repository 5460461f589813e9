#pragma once
#include <span>
#include <string_view>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/core/concepts.hpp>
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

  template <Scalar T>
  struct Saved {
    detail::Buffer<T> gate, up, hidden;  // [S,F] gate·x, up·x, and act(gate·x) ⊙ up·x (or act(up·x))
    detail::Buffer<T> d_gate, d_up;      // [S,F] backward scratch
    std::vector<detail::Tile> tiles;
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
    row_tiles(offsets, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const Index n = tile.end - tile.begin;
      const auto x = rows.middleRows(tile.begin, n);
      auto u = up.middleRows(tile.begin, n);
      auto h = hidden.middleRows(tile.begin, n);
      u.noalias() = x * weights[Slot::up].slice(tile.expert).transpose();
      if constexpr (Act::gated) {
        auto g = gate.middleRows(tile.begin, n);
        g.noalias() = x * weights[Slot::gate].slice(tile.expert).transpose();
        h = g.unaryExpr([](T v) { return Act::apply(v); }).cwiseProduct(u);
      } else {
        h = u.unaryExpr([](T v) { return Act::apply(v); });
      }
      out.middleRows(tile.begin, n).noalias() =
          h * weights[Slot::down].slice(tile.expert).transpose();
    });
  }

  /// d_out [S,H] → d_rows [S,H]; adds the weight gradients into grads.
  template <Scalar T>
  void backward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows,
                std::span<const Index> offsets, Saved<T>& saved, ConstMatrixRef<T> d_out,
                MatrixRef<T> d_rows, std::span<Tensor<T>> grads) const {
    using Slot = detail::FfnSlots<Act>;
    const Index count = rows.rows(), ffn = weights[Slot::up].shape()[1];
    const Index experts = static_cast<Index>(offsets.size()) - 1;
    auto gate = saved.gate.matrix(Act::gated ? count : 0, ffn);
    auto up = saved.up.matrix(count, ffn);
    auto hidden = saved.hidden.matrix(count, ffn);
    auto d_gate = saved.d_gate.matrix(Act::gated ? count : 0, ffn);
    auto d_up = saved.d_up.matrix(count, ffn);

    row_tiles(offsets, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const Index n = tile.end - tile.begin;
      auto du = d_up.middleRows(tile.begin, n);
      const auto u = up.middleRows(tile.begin, n);
      du.noalias() = d_out.middleRows(tile.begin, n) * weights[Slot::down].slice(tile.expert);
      auto dx = d_rows.middleRows(tile.begin, n);
      if constexpr (Act::gated) {
        const auto g = gate.middleRows(tile.begin, n);
        auto dg = d_gate.middleRows(tile.begin, n);
        dg = du.cwiseProduct(u).cwiseProduct(g.unaryExpr([](T v) { return Act::derivative(v); }));
        du = du.cwiseProduct(g.unaryExpr([](T v) { return Act::apply(v); }));
        dx.noalias() = dg * weights[Slot::gate].slice(tile.expert);
        dx.noalias() += du * weights[Slot::up].slice(tile.expert);
      } else {
        du = du.cwiseProduct(u.unaryExpr([](T v) { return Act::derivative(v); }));
        dx.noalias() = du * weights[Slot::up].slice(tile.expert);
      }
    });

    detail::make_tiles(experts, options.column_tile, [&](Index) { return ffn; }, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& tile) {
      const Index first = offsets[static_cast<std::size_t>(tile.expert)];
      const Index n = offsets[static_cast<std::size_t>(tile.expert) + 1] - first;
      if (n == 0) return;
      const Index width = tile.end - tile.begin;
      const auto x = rows.middleRows(first, n);
      grads[Slot::up].slice(tile.expert).middleRows(tile.begin, width).noalias() +=
          d_up.block(first, tile.begin, n, width).transpose() * x;
      if constexpr (Act::gated)
        grads[Slot::gate].slice(tile.expert).middleRows(tile.begin, width).noalias() +=
            d_gate.block(first, tile.begin, n, width).transpose() * x;
      grads[Slot::down].slice(tile.expert).middleCols(tile.begin, width).noalias() +=
          d_out.middleRows(first, n).transpose() * hidden.block(first, tile.begin, n, width);
    });
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
};

/// SwiGLU experts, the default.
using GroupedGemm = GroupedGemmType<SwiGLU>;

static_assert(Expert<GroupedGemm>);

}  // namespace moekit
