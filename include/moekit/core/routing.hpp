#pragma once
// What flows between the policies: the layer's shape, the router's choices (Routing) and the
// dispatcher's row layout (Plan). Gathering rows by the plan's indices is the whole dispatch:
// there are no one-hot [T,E,C] tensors anywhere.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include <moekit/core/group.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/core/token_loops.hpp>

namespace moekit {

/// The sizes every policy may check itself against.
struct LayerShape {
  Index hidden = 0;   // H: width of a token
  Index ffn = 0;      // F: hidden width of one expert
  Index experts = 0;  // E
  int top_k = 0;      // K: experts per token
  Index shared_ffn = 0;  // F_s: hidden width of the shared expert (0: none)
};

/// Sizes and run-time settings of a layer; the policies carry their own options.
struct LayerConfig {
  Index hidden = 0;          // H
  Index ffn = 0;             // F
  Index experts = 0;         // E
  Index shared_ffn = 0;      // F_s: the shared expert's width, with a Shared<> policy; else 0
  std::uint64_t seed = 0;    // parameter initialisation
  bool check_finite = true;  // reject NaN and ±Inf in x and dy, naming the first one found
};

/// How a router turns logits into scores.
enum class ScoreFn { softmax, sigmoid };

/// What a choice's weight multiplies: the expert's output, y = Σ_k w_k · expert_k(x) (Mixtral,
/// DeepSeek, Qwen), or its input, y = Σ_k expert_k(w_k · x) (Llama 4).
enum class WeightAt { output, input };

/// What a router that draws in training is told at select: the layer's mode, its step and this
/// rank's first token in the numbering of the whole batch (core/random.hpp's counter); a router
/// that reads token ids, the ids of this rank's tokens (set_token_ids()); a router whose choices
/// depend on the whole batch (ExpertChoice), the ranks whose tokens form it.
struct RouterContext {
  bool training = true;
  std::uint64_t step = 0;
  Index first_token = 0;
  std::span<const Index> token_ids{};  // [T]
  const BatchGroup* batch = &single_process_batch();
};

/// Multiplicative jitter of the router's input in training (Switch Transformer): ε = 0 is none;
/// the draws come from `seed` (core/random.hpp).
struct InputJitter {
  double epsilon = 0;
  std::uint64_t seed = 0;
};

/// Shazeer's noisy top-k gating (2017): in training the router's logits become
/// H = x·W_gᵀ + n ⊙ softplus(x·W_nᵀ), n ~ N(0, 1) drawn from `seed`, W_n the layer's parameter
/// router.noise_weight; at evaluation H is the clean x·W_gᵀ. Off (enabled = false): no W_n.
struct NoisyGating {
  bool enabled = false;
  std::uint64_t seed = 0;
};

/// Noisy gating's logits as a forward computed them, for the balancing terms that read them
/// (LoadLoss).                                                                      [T,E] each
template <class T>
struct NoisyLogits {
  ConstMatrixRef<T> clean;  // x·W_gᵀ (+ the logit bias)
  ConstMatrixRef<T> noisy;  // H: clean + n ⊙ softplus(noise) in training; clean at evaluation
  ConstMatrixRef<T> noise;  // x·W_nᵀ: the noise's standard deviation is softplus of it
};

/// softplus(v) = log(1 + eᵛ), without overflow at any v.
template <class T>
T softplus(T v) {
  return std::max(v, T(0)) + std::log1p(std::exp(-std::abs(v)));
}

/// Logits → scores, row by row, in place: a softmax over each token's experts, or a sigmoid of
/// each logit.                                                                           [T,E]
template <Scalar T>
void score_logits(ScoreFn fn, MatrixRef<T> scores) {
  for_each_token(scores.rows(), [&](Index t) {
    auto row = scores.row(t);
    if (fn == ScoreFn::softmax) {
      row.array() = (row.array() - row.maxCoeff()).exp();  // max first: no overflow at any logit
      row /= row.sum();
    } else {
      row.array() = (T(1) + (-row.array()).exp()).inverse();
    }
  });
}

inline constexpr std::string_view to_string(ScoreFn f) {
  return f == ScoreFn::softmax ? "softmax" : "sigmoid";
}

/// The router's decision for T tokens: K experts each, best first, and their combine weights.
/// A router may leave a choice empty (GShard's second expert, when not drawn): its index is then
/// ~e < 0, e the expert it passed over (which its backward may need), and it gets no row.
template <Scalar T>
struct Routing {
  Index tokens = 0;
  int top_k = 0;
  std::vector<Index> index;  // [T,K] expert of choice (t,k), or ~expert for an empty choice
  std::vector<T> weight;     // [T,K] its combine weight (0 for an empty choice)

  /// The index of a choice left empty that passed over `expert`; whether an index is one; the
  /// expert an index names either way.
  static constexpr Index left_empty(Index expert) { return ~expert; }
  static constexpr bool is_empty(Index index) { return index < 0; }
  static constexpr Index expert_of(Index index) { return index < 0 ? ~index : index; }

  void resize(Index t, int k) {
    tokens = t;
    top_k = k;
    index.resize(static_cast<std::size_t>(t * k));
    weight.resize(static_cast<std::size_t>(t * k));
  }
  Index choices() const { return tokens * top_k; }
};

/// Where each kept (token, expert) pair lives in the permuted rows [S,H]: contiguous blocks, one
/// per expert, in expert order. A choice is numbered t·K + k.
struct Plan {
  static constexpr Index no_slot = -1;

  Index tokens = 0;
  Index experts = 0;
  int top_k = 0;
  std::vector<Index> counts;   // [E]   rows in each expert's block
  std::vector<Index> offsets;  // [E+1] first row of each block; offsets[E] = S
  std::vector<Index> slot;     // [T·K] row of each choice, or no_slot when it was dropped
  std::vector<Index> source;   // [S]   choice that fills each row, or no_slot for a padding row
  Index dropped = 0;           // choices that got no row

  Index rows() const { return offsets.empty() ? 0 : offsets.back(); }

  void reset(Index t, Index e, int k) {
    tokens = t;
    experts = e;
    top_k = k;
    counts.assign(static_cast<std::size_t>(e), 0);
    offsets.assign(static_cast<std::size_t>(e + 1), 0);
    slot.assign(static_cast<std::size_t>(t * k), no_slot);
    source.clear();
    dropped = 0;
  }

  /// offsets from counts: each expert's block starts where the one before it ends.
  void set_offsets() {
    for (std::size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + counts[e];
  }

  /// The counting sort every plan starts from: each choice c with keep(c), of expert index[c],
  /// gets the next row of that expert's block, in choice order (experts, then tokens, then k);
  /// the others are dropped. A choice the router left empty gets no row and is not a drop. Sets
  /// counts, offsets, slot, source and dropped, after reset().
  template <class Keep>
  void place(std::span<const Index> index, Keep keep) {
    constexpr Index kept = 0;  // a kept choice's slot until its row is known
    for (std::size_t c = 0; c < index.size(); ++c) {
      if (index[c] < 0) continue;
      if (keep(c)) slot[c] = kept, ++counts[static_cast<std::size_t>(index[c])];
      else ++dropped;
    }
    set_offsets();
    source.resize(static_cast<std::size_t>(rows()));
    std::fill(counts.begin(), counts.end(), 0);  // each block's fill cursor, back to its count at the end
    for (std::size_t c = 0; c < index.size(); ++c) {
      if (slot[c] == no_slot) continue;
      const auto e = static_cast<std::size_t>(index[c]);
      const Index row = offsets[e] + counts[e]++;
      slot[c] = row;
      source[static_cast<std::size_t>(row)] = static_cast<Index>(c);
    }
  }
};

}  // namespace moekit

namespace moekit {

/// What a balancer knows of the router it balances and of the batch.
struct BalanceContext {
  ScoreFn score = ScoreFn::softmax;
  int top_k = 1;
  /// The ranks whose tokens form the batch. Batch-wide numbers are summed over it, and a loss's
  /// gradient is scaled by its size D: gradients are averaged over those ranks, and the loss,
  /// one term of the batch, must survive the average whole. docs/distributed.md#gradients
  const BatchGroup* batch = &single_process_batch();
  /// The layer's mode: true after train() (the default), false after eval(). Policies that
  /// behave differently at evaluation read it (Sinkhorn selects on the plain scores).
  bool training = true;
  /// Where the batch's sequences begin, and the token count last ([B+1]), as set_sequences() told
  /// the layer; empty: the batch is one sequence. Terms computed per sequence read it (SeqAuxLoss).
  std::span<const Index> sequence_offsets{};
  /// E, for terms that read the routing rather than the [T,E] scores (ImportanceLoss).
  Index experts = 0;
};

/// The experts a rank computes: [first, first + count).
struct ExpertRange {
  Index first = 0;
  Index count = 0;
};

}  // namespace moekit
