#pragma once
#include <array>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/gemm.hpp>
#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/error.hpp>
#include <moekit/expert/activation.hpp>

namespace moekit {

/// FFN experts computed as GEMMs over each expert's contiguous block of rows, in TBB tiles.
/// docs/policies/expert.md#groupedgemm
///
/// Each product is cut into tiles of (expert, block of rows, block of output columns), so a tile
/// packs only its slice of the expert's weights and a few tokens still give every thread work.
/// The weight gradients are tiled by (expert, block of columns) over all of the expert's rows:
/// each tile owns its slice of the gradient and reduces over the rows in a fixed order; a bias's
/// gradient is summed by the tiles of the first block of columns.
///
/// With Precision::bf16 (a float layer's MoELayer<…, bf16>) every product rounds its operands to
/// bf16 and sums in float; the activation, its gradient and what is saved stay float.
/// With Precision::int8 (MoELayer<…, int8>, forward only) prepare() quantises the weights once per
/// output channel and forward quantises its rows, then the activation's output, per row; the
/// activation and the biases stay float.
template <Activation Act, ExpertBias Bias = ExpertBias::none, Precision P = Precision::scalar>
struct GroupedGemmType {
  using policy_kind = expert_kind;
  using activation = Act;
  static constexpr std::string_view name = "GroupedGemm";
  static constexpr ExpertBias bias = Bias;
  static constexpr Precision precision = P;

  struct Options {
    Index row_tile = 256;     // rows per tile (weight gradients take all of an expert's rows)
    Index column_tile = 256;  // output columns per tile, of F or of H (weight gradients: square tiles)
  };
  Options options{};
  /// Precision::int8: each expert's weights as prepare() quantised them, which forward reads
  /// (no gate for activations without one). Made from the weights, never set by hand.
  struct Int8Experts {
    std::vector<Int8Weights> gate, up, down;
  };
  Int8Experts int8_weights{};

  /// What forward keeps for backward. Backward overwrites it with its gradients (gate and up
  /// become d_gate and d_up, hidden a scratch), so no [S,F] buffer is added for the backward.
  template <Scalar T>
  struct Saved {
    detail::Buffer<T> gate, up, hidden;  // [S,F] gate·x, up·x, and act(gate·x) ⊙ up·x (or act(up·x))
    std::vector<detail::Tile> tiles;
    Int8Rows quantised;  // int8: the rows, then the hidden rows, as the products read them

    /// gate (no rows without a gate), up and hidden for `count` rows of `ffn` columns.
    std::array<MatrixMap<T>, 3> matrices(Index count, Index ffn) {
      return {gate.matrix(Act::gated ? count : 0, ffn), up.matrix(count, ffn), hidden.matrix(count, ffn)};
    }
  };

  static std::vector<ParameterSpec> parameters(const LayerShape& s, Index local_experts) {
    return detail::ffn_parameters<Act, Bias>(s, local_experts);
  }

  void validate(const LayerShape&) const {
    require(options.row_tile >= 1 && options.column_tile >= 1,
            "moekit::GroupedGemm: row_tile = ", options.row_tile,
            ", column_tile = ", options.column_tile, "; expected both >= 1");
  }

  /// Precision::int8: quantises the experts' weights (gate, up and down of each expert) for the
  /// forwards that follow. The layer calls it whenever its parameters are set.
  template <Scalar T>
    requires(P == Precision::int8)
  void prepare(std::span<const Tensor<T>> weights) {
    const Index experts = weights[Slot::up].shape()[0];
    const std::pair<std::vector<Int8Weights>*, int> products[] = {  // and the slot each is made from
        {&int8_weights.gate, Act::gated ? Slot::gate : -1},
        {&int8_weights.up, Slot::up},
        {&int8_weights.down, Slot::down}};
    for (const auto& [product, slot] : products) product->resize(slot < 0 ? 0 : static_cast<std::size_t>(experts));
    detail::for_each_index(3 * experts, 1, [&](Index i) {
      const auto& [product, slot] = products[i / experts];
      if (slot >= 0) (*product)[static_cast<std::size_t>(i % experts)] = Int8Weights(weights[slot].slice(i % experts));
    });
  }

  /// The bytes of quantised weights a forward reads (int8): values, scales and corrections.
  std::size_t int8_bytes() const {
    std::size_t bytes = 0;
    for (const auto* product : {&int8_weights.gate, &int8_weights.up, &int8_weights.down})
      for (const auto& w : *product) bytes += w.bytes();
    return bytes;
  }

  /// rows [S,H] in per-expert blocks (offsets [E+1]) → out [S,H].
  template <Scalar T>
  void forward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows, std::span<const Index> offsets,
               MatrixRef<T> out, Saved<T>& saved, Workspace<T>& workspace) const {
    if constexpr (P == Precision::int8) {
      forward_int8(weights, rows, offsets, out, saved);
      return;
    }
    const Index ffn = weights[Slot::up].shape()[1];
    auto [gate, up, hidden] = saved.matrices(rows.rows(), ffn);
    workspace.ready();

    // gate = x · W_gateᵀ (+ b_gate), up = x · W_upᵀ (+ b_up) and hidden = act(gate) ⊙ up, by
    // blocks of F columns.
    tiles(offsets, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      const auto x = rows.middleRows(t.row, t.rows);
      auto u = up.block(t.row, t.column, t.rows, t.columns);
      auto h = hidden.block(t.row, t.column, t.rows, t.columns);
      const auto weight = [&](int slot) {
        return weights[slot].slice(t.expert).middleRows(t.column, t.columns).transpose();
      };
      if constexpr (Act::gated) {
        auto g = gate.block(t.row, t.column, t.rows, t.columns);
        const auto gate_weight = weight(Slot::gate), up_weight = weight(Slot::up);
        if constexpr (P == Precision::scalar)
          gemm_each(workspace, std::array{&g, &u}, x, std::array{&gate_weight, &up_weight});
        else
          bf16_gemm_each(std::array{&g, &u}, x, std::array{&gate_weight, &up_weight});
        if constexpr (Slot::biased) {
          g.rowwise() += bias_of(weights, Slot::gate_bias, t.expert, t.column, t.columns);
          u.rowwise() += bias_of(weights, Slot::up_bias, t.expert, t.column, t.columns);
        }
        detail::activate_gated<Act>(g, u, h);
      } else {
        gemm<P>(workspace, u, x, weight(Slot::up));
        if constexpr (Slot::biased) u.rowwise() += bias_of(weights, Slot::up_bias, t.expert, t.column, t.columns);
        detail::activate<Act>(u, h);
      }
    });

    // out = hidden · W_downᵀ (+ b_down), by blocks of H columns.
    tiles(offsets, out.cols(), saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      auto o = out.block(t.row, t.column, t.rows, t.columns);
      gemm<P>(workspace, o, hidden.middleRows(t.row, t.rows),
           weights[Slot::down].slice(t.expert).middleRows(t.column, t.columns).transpose());
      if constexpr (Slot::biased) o.rowwise() += bias_of(weights, Slot::down_bias, t.expert, t.column, t.columns);
    });
    workspace.ready();  // every thread now has room for every product of this step
  }

  /// d_out [S,H] → d_rows [S,H], written over the rows once the weight gradients, which read
  /// them, are added into grads. Consumes `saved`.
  template <Scalar T>
  void backward(std::span<const Tensor<T>> weights, MatrixRef<T> rows, std::span<const Index> offsets,
                Saved<T>& saved, ConstMatrixRef<T> d_out, std::span<Tensor<T>> grads,
                Workspace<T>& workspace) const {
    static_assert(P != Precision::int8 || sizeof(T) == 0,
                  "moekit::GroupedGemm: int8 experts are for inference, forward only; train in float or bf16 "
                  "and convert (moekit::convert_layer)");
    const Index ffn = weights[Slot::up].shape()[1];
    auto [gate, up, hidden] = saved.matrices(rows.rows(), ffn);
    workspace.ready();

    // d_down [H,F] = d_outᵀ · hidden (d_b_down = Σ_rows d_out), before hidden's buffer is
    // reused below.
    const Index width = d_out.cols();
    weight_tiles(offsets, width, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      const auto [first, n] = detail::block_of(offsets, t.expert);
      const auto d_y = d_out.block(first, t.row, n, t.rows);
      gemm_add<P>(workspace, grads[Slot::down].slice(t.expert).block(t.row, t.column, t.rows, t.columns),
               d_y.transpose(), hidden.block(first, t.column, n, t.columns));
      if constexpr (Slot::biased)
        if (t.column == 0) bias_of(grads, Slot::down_bias, t.expert, t.row, t.rows) += d_y.colwise().sum();
    });

    // d_hidden = d_out · W_down, then through the activation: gate ← d_gate and up ← d_up in
    // place; by blocks of F columns.
    tiles(offsets, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      auto d_hidden = hidden.block(t.row, t.column, t.rows, t.columns);
      gemm<P>(workspace, d_hidden, d_out.middleRows(t.row, t.rows),
                   weights[Slot::down].slice(t.expert).middleCols(t.column, t.columns));
      auto u = up.block(t.row, t.column, t.rows, t.columns);
      if constexpr (Act::gated) {
        auto g = gate.block(t.row, t.column, t.rows, t.columns);
        detail::activate_gated_backward<Act>(g, u, d_hidden);
      } else {
        detail::activate_backward<Act>(u, d_hidden);
      }
    });

    // d_up [F,H] = d_upᵀ · x, and d_gate likewise: the last reads of the rows. Their biases'
    // gradients are the sums of d_up and d_gate over the rows.
    weight_tiles(offsets, ffn, width, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      const auto [first, n] = detail::block_of(offsets, t.expert);
      const auto x = rows.block(first, t.column, n, t.columns);
      const auto d_up = up.block(first, t.row, n, t.rows);
      gemm_add<P>(workspace, grads[Slot::up].slice(t.expert).block(t.row, t.column, t.rows, t.columns),
               d_up.transpose(), x);
      if constexpr (Slot::biased)
        if (t.column == 0) bias_of(grads, Slot::up_bias, t.expert, t.row, t.rows) += d_up.colwise().sum();
      if constexpr (Act::gated) {
        const auto d_gate = gate.block(first, t.row, n, t.rows);
        gemm_add<P>(workspace, grads[Slot::gate].slice(t.expert).block(t.row, t.column, t.rows, t.columns),
                 d_gate.transpose(), x);
        if constexpr (Slot::biased)
          if (t.column == 0) bias_of(grads, Slot::gate_bias, t.expert, t.row, t.rows) += d_gate.colwise().sum();
      }
    });

    // d_rows = d_gate · W_gate + d_up · W_up over the rows, by blocks of H columns.
    tiles(offsets, width, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      auto dx = rows.block(t.row, t.column, t.rows, t.columns);
      gemm<P>(workspace, dx, up.middleRows(t.row, t.rows),
                   weights[Slot::up].slice(t.expert).middleCols(t.column, t.columns));
      if constexpr (Act::gated)
        gemm_add<P>(workspace, dx, gate.middleRows(t.row, t.rows),
                         weights[Slot::gate].slice(t.expert).middleCols(t.column, t.columns));
    });
    workspace.ready();  // every thread now has room for every product of this step
  }

 private:
  using Slot = detail::FfnSlots<Act, Bias>;

  /// forward with int8 products: the rows quantised, gate and up, the activation in float, the
  /// hidden rows quantised, down.
  template <Scalar T>
  void forward_int8(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows, std::span<const Index> offsets,
                    MatrixRef<T> out, Saved<T>& saved) const {
    const Index experts = static_cast<Index>(offsets.size()) - 1, ffn = weights[Slot::up].shape()[1];
    require(static_cast<Index>(int8_weights.up.size()) == experts, "moekit::GroupedGemm: int8 weights for ",
            int8_weights.up.size(), " experts; expected ", experts, " (call prepare(weights) when the weights are set)");
    auto [gate, up, hidden] = saved.matrices(rows.rows(), ffn);
    Int8Rows& quantised = saved.quantised;
    const auto quantise = [&](ConstMatrixRef<T> x) {
      quantised.resize(x.rows(), x.cols());
      detail::for_each_block(x.rows(), int8_row_block,
                             [&](Index first, Index n) { quantised.quantize(first, x.middleRows(first, n)); });
    };

    quantise(rows);
    int8_tiles(offsets, ffn, saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      const auto e = static_cast<std::size_t>(t.expert);
      auto u = up.block(t.row, t.column, t.rows, t.columns);
      auto h = hidden.block(t.row, t.column, t.rows, t.columns);
      int8_gemm(u, quantised, t.row, int8_weights.up[e], t.column);
      if constexpr (Slot::biased) u.rowwise() += bias_of(weights, Slot::up_bias, t.expert, t.column, t.columns);
      if constexpr (Act::gated) {
        auto g = gate.block(t.row, t.column, t.rows, t.columns);
        int8_gemm(g, quantised, t.row, int8_weights.gate[e], t.column);
        if constexpr (Slot::biased) g.rowwise() += bias_of(weights, Slot::gate_bias, t.expert, t.column, t.columns);
        detail::activate_gated<Act>(g, u, h);
      } else {
        detail::activate<Act>(u, h);
      }
    });

    quantise(hidden);
    int8_tiles(offsets, out.cols(), saved.tiles);
    detail::for_each_tile(saved.tiles, [&](const detail::Tile& t) {
      auto o = out.block(t.row, t.column, t.rows, t.columns);
      int8_gemm(o, quantised, t.row, int8_weights.down[static_cast<std::size_t>(t.expert)], t.column);
      if constexpr (Slot::biased) o.rowwise() += bias_of(weights, Slot::down_bias, t.expert, t.column, t.columns);
    });
  }

  /// Rows a thread quantises at a time.
  static constexpr Index int8_row_block = 64;

  /// int8 tiles: the columns in whole panels of the quantised weights.
  void int8_tiles(std::span<const Index> offsets, Index columns, std::vector<detail::Tile>& out) const {
    const Index panel = detail::int8_panel, width = (options.column_tile + panel - 1) / panel * panel;
    detail::row_tiles(offsets, options.row_tile, columns, width, out);
  }

  template <Scalar T>
  using Row = Eigen::Matrix<T, 1, Eigen::Dynamic>;

  /// Columns [first, first + count) of expert e's bias in slot `slot` ([E,width]): a row vector.
  template <Scalar T>
  static Eigen::Map<const Row<T>> bias_of(std::span<const Tensor<T>> tensors, int slot, Index e, Index first,
                                          Index count) {
    const auto& bias = tensors[static_cast<std::size_t>(slot)];
    return {bias.data() + e * bias.shape()[1] + first, count};
  }
  template <Scalar T>
  static Eigen::Map<Row<T>> bias_of(std::span<Tensor<T>> tensors, int slot, Index e, Index first, Index count) {
    auto& bias = tensors[static_cast<std::size_t>(slot)];
    return {bias.data() + e * bias.shape()[1] + first, count};
  }

  /// A product's tiles over the rows, and a weight gradient's, in this layer's tile sizes.
  void tiles(std::span<const Index> offsets, Index columns, std::vector<detail::Tile>& out) const {
    detail::row_tiles(offsets, options.row_tile, columns, options.column_tile, out);
  }
  void weight_tiles(std::span<const Index> offsets, Index rows, Index columns, std::vector<detail::Tile>& out) const {
    detail::weight_gradient_tiles(offsets, rows, columns, options.column_tile, out);
  }
};

/// SwiGLU experts, the default.
using GroupedGemm = GroupedGemmType<SwiGLU>;

static_assert(Expert<GroupedGemm>);
static_assert(Expert<GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>>);

}  // namespace moekit
