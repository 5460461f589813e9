#pragma once
#include <cmath>
#include <span>
#include <string_view>
#include <vector>

#include <moekit/balance/aux_loss.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// DeepSeek-V2/V3's sequence-wise auxiliary loss, as Megatron-Core's seq_aux_loss computes it:
/// AuxLoss's formula over each sequence of the batch on its own, averaged over the B sequences.
/// docs/policies/balance.md#seqauxloss
///
///   L = (1/B) · Σ_b c · E / (K · S_b²) · Σ_i n_bi · Σ_{t ∈ b} s̃_ti
///
/// The sequences are the layer's set_sequences(); none set, the batch is one sequence (and L is
/// AuxLoss's). DeepSeek-V3 trains it beside AuxFree: Balanced<AuxFree, SeqAuxLoss>.
struct SeqAuxLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "SeqAuxLoss";

  struct Options {
    double coefficient = 1e-4;  // c; DeepSeek-V3: α = 1e-4
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<AuxLoss::State<T>> sequences;  // each sequence's, reused
    std::vector<Index> whole_batch;            // [2] {0, T}: the offsets when none were set
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.coefficient) && options.coefficient >= 0, "moekit::SeqAuxLoss: coefficient = ",
            options.coefficient, "; expected a finite number >= 0");
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state) const {
    require(context.batch->size() == 1, "moekit::SeqAuxLoss: the batch is split over ", context.batch->size(),
            " ranks; expected one process (over ranks the sequences are not yet gathered)");
    const auto offsets = sequence_offsets(scores.rows(), context, state);
    const AuxLoss term = per_sequence(offsets);
    if (state.sequences.size() < offsets.size() - 1) state.sequences.resize(offsets.size() - 1);
    T loss = 0;
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b)
      loss += term.forward<T>(scores.middleRows(offsets[b], offsets[b + 1] - offsets[b]), context, state.sequences[b]);
    return loss;
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
                MatrixRef<T> d_logits) const {
    const auto offsets = sequence_offsets(scores.rows(), context, state);
    const AuxLoss term = per_sequence(offsets);
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
      const Index first = offsets[b], count = offsets[b + 1] - offsets[b];
      term.backward<T>(scores.middleRows(first, count), context, state.sequences[b], d_logits.middleRows(first, count));
    }
  }

 private:
  /// The layer's sequence offsets, or {0, T} when it was given none.
  template <Scalar T>
  static std::span<const Index> sequence_offsets(Index tokens, const BalanceContext& context, State<T>& state) {
    if (!context.sequence_offsets.empty()) return context.sequence_offsets;
    state.whole_batch = {0, tokens};
    return state.whole_batch;
  }

  /// AuxLoss with c / B: each sequence's loss, already divided by the number of sequences.
  AuxLoss per_sequence(std::span<const Index> offsets) const {
    return AuxLoss{{.coefficient = options.coefficient / double(offsets.size() - 1)}};
  }
};

static_assert(Balancer<SeqAuxLoss>);

}  // namespace moekit
