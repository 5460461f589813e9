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
/// AuxLoss's). Over ranks each rank's sequences are its own (a sequence does not cross ranks; none
/// set, a rank's tokens are one sequence) and L is the mean over every rank's: the whole batch's
/// loss, as one process given all the sequences computes it. DeepSeek-V3 trains it beside
/// AuxFree: Balanced<AuxFree, SeqAuxLoss>.
struct SeqAuxLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "SeqAuxLoss";
  static constexpr bool assumes_top_k = true;  // f_i counts each token's top K

  struct Options {
    double coefficient = 1e-4;  // c; DeepSeek-V3: α = 1e-4
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<AuxLoss::State<T>> sequences;  // each sequence's, reused
    std::vector<Index> whole_batch;            // {0, T}, or {0} with no tokens: the offsets when none were set
    std::vector<double> packed;                // [2] Σ_b L_b and B, then the whole batch's
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.coefficient) && options.coefficient >= 0, "moekit::SeqAuxLoss: coefficient = ",
            options.coefficient, "; expected a finite number >= 0");
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state) const {
    const auto offsets = sequence_offsets(scores.rows(), context, state);
    const AuxLoss term{{.coefficient = options.coefficient}};
    const BalanceContext sequence = within_a_sequence(context);
    const auto sequences = offsets.size() - 1;
    if (state.sequences.size() < sequences) state.sequences.resize(sequences);
    double sum = 0;
    for (std::size_t b = 0; b < sequences; ++b)
      sum += term.forward<T>(scores.middleRows(offsets[b], offsets[b + 1] - offsets[b]), sequence, state.sequences[b]);
    state.packed = {sum, double(sequences)};
    context.batch->sum(state.packed);  // over ranks: every rank's sequences
    return state.packed[1] > 0 ? T(state.packed[0] / state.packed[1]) : T(0);
  }

  /// Each rank's share of the mean's gradient, times the D ranks the layer averages gradients over.
  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
                MatrixRef<T> d_logits) const {
    if (state.packed[1] == 0) return;
    const auto offsets = sequence_offsets(scores.rows(), context, state);
    const AuxLoss term{{.coefficient = options.coefficient * context.batch->size() / state.packed[1]}};
    const BalanceContext sequence = within_a_sequence(context);
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
      const Index first = offsets[b], count = offsets[b + 1] - offsets[b];
      term.backward<T>(scores.middleRows(first, count), sequence, state.sequences[b], d_logits.middleRows(first, count));
    }
  }

 private:
  /// The layer's sequence offsets, or {0, T} when it was given none ({0}, no sequence, for no tokens).
  template <Scalar T>
  static std::span<const Index> sequence_offsets(Index tokens, const BalanceContext& context, State<T>& state) {
    if (!context.sequence_offsets.empty()) return context.sequence_offsets;
    state.whole_batch.assign(1, 0);
    if (tokens > 0) state.whole_batch.push_back(tokens);
    return state.whole_batch;
  }

  /// The context of one sequence: this rank's alone, whatever the batch.
  static BalanceContext within_a_sequence(BalanceContext context) {
    context.batch = &single_process_batch();
    return context;
  }
};

static_assert(Balancer<SeqAuxLoss>);

}  // namespace moekit
