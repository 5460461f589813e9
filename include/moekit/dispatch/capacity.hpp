#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <string_view>

#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// Which choices an expert over capacity keeps.
enum class DropPolicy {
  weight,    // the C highest-weighted (Megatron-Core "probs", DeepSpeed "probs")
  position,  // the C earliest tokens (Megatron-Core "position")
};

/// Each expert takes at most C rows; the rest of its choices are dropped: no compute, no
/// gradient, and a token dropped by all its experts gets zero from them.
/// docs/policies/dispatch.md#capacity
///
///   C = max(ceil(T · K / E · capacity_factor), min_capacity)
///
/// capacity_factor = 0 is Tutel's: C = the largest expert count, so nothing is dropped and
/// every block is padded to it. With pad, every expert gets exactly C rows (C capped at T); the
/// padding rows are zero and carry weight 0. Surviving weights are not renormalised (Megatron-Core,
/// Switch) unless renormalize is set (DeepSpeed). Kept rows stay in token order inside each block.
struct Capacity {
  using policy_kind = dispatcher_kind;
  static constexpr std::string_view name = "Capacity";

  struct Options {
    double capacity_factor = 1.0;  // 0: the largest expert count (dropless, padded)
    Index min_capacity = 0;        // DeepSpeed: 4
    DropPolicy drop = DropPolicy::weight;
    bool pad = false;              // every expert gets exactly C rows
    bool renormalize = false;      // DeepSpeed: kept weights of a token rescaled to their old sum
  };
  Options options{};

  void validate(const LayerShape& shape) const {
    require(std::isfinite(options.capacity_factor) && options.capacity_factor >= 0,
            "moekit::Capacity: capacity_factor = ", options.capacity_factor,
            "; expected a finite number >= 0 (0 means the largest expert count)");
    require(options.min_capacity >= 0, "moekit::Capacity: min_capacity = ",
            options.min_capacity, "; expected >= 0");
    require(!(options.renormalize && shape.top_k == 1),
            "moekit::Capacity: renormalize = true with K = 1; every kept weight would be 1 "
            "and the router would get no gradient; expected K > 1 or renormalize = false");
  }

  /// With renormalize, after drops: w'_k = m_k·w_k / max(Σ_j m_j·w_j, ε), m = kept, ε = the
  /// scalar's epsilon (DeepSpeed's top-2 and top-k gating). Without it, weights are unchanged.
  template <Scalar T>
  void adjust_weights(const Plan& plan, Routing<T>& routing) const {
    if (!options.renormalize) return;
    for_each_token(plan, [&](Index first, int k) {
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += kept(plan, first + j) ? routing.weight[at(first + j)] : T(0);
      const T denominator = std::max(sum, std::numeric_limits<T>::epsilon());
      for (int j = 0; j < k; ++j)
        routing.weight[at(first + j)] = kept(plan, first + j) ? routing.weight[at(first + j)] / denominator : T(0);
    });
  }

  /// d(loss)/d(w') → d(loss)/d(w), in place, given the weights before adjust_weights.
  template <Scalar T>
  void adjust_weights_backward(const Plan& plan, std::span<const T> weight, std::span<T> d_weight) const {
    if (!options.renormalize) return;
    for_each_token(plan, [&](Index first, int k) {
      T sum = 0, dot = 0;
      for (int j = 0; j < k; ++j)
        if (kept(plan, first + j)) {
          sum += weight[at(first + j)];
          dot += d_weight[at(first + j)] * weight[at(first + j)];
        }
      const bool clamped = sum < std::numeric_limits<T>::epsilon();  // then the denominator is constant
      const T denominator = clamped ? std::numeric_limits<T>::epsilon() : sum;
      for (int j = 0; j < k; ++j) {
        T& d = d_weight[at(first + j)];
        d = !kept(plan, first + j) ? T(0) : clamped ? d / denominator : (d - dot / sum) / sum;
      }
    });
  }

  /// C for T tokens, K choices each, over E experts whose largest count is `largest`.
  Index capacity(Index tokens, int top_k, Index experts, Index largest) const {
    if (options.capacity_factor == 0) return largest;
    const double exact = double(tokens) * top_k / double(experts) * options.capacity_factor;
    Index c = std::max(static_cast<Index>(std::ceil(exact - 1e-9)), options.min_capacity);
    return options.pad ? std::min(c, tokens) : c;  // an expert never has more than T choices
  }

  /// Whether every block is padded to C: asked for, or implied by capacity_factor = 0.
  bool pads() const { return options.pad || options.capacity_factor == 0; }

  template <Scalar T>
  void plan(const Routing<T>& routing, Index experts, Plan& plan) const {
    plan.reset(routing.tokens, experts, routing.top_k);
    plan.place(routing.index, [](std::size_t) { return true; });
    // plan.slot serves first as the dropless order: the placed choices grouped by expert, in token
    // order (fewer than T·K when the router left choices empty).
    std::vector<Index>& order = plan.slot;
    order.assign(plan.source.begin(), plan.source.end());
    const Index largest = experts ? *std::max_element(plan.counts.begin(), plan.counts.end()) : 0;
    const Index cap = capacity(routing.tokens, routing.top_k, experts, largest);
    require(cap >= 1 || routing.tokens == 0, "moekit::Capacity: capacity = ", cap, " for ",
            routing.tokens, " tokens; expected at least 1 (raise capacity_factor or min_capacity)");

    // Trim each block to its first `cap` choices after ordering by the drop policy.
    for (Index e = 0; e < experts; ++e) {
      const auto block = order.begin() + plan.offsets[static_cast<std::size_t>(e)];
      const Index count = plan.counts[static_cast<std::size_t>(e)];
      if (count <= cap) continue;
      if (options.drop == DropPolicy::weight) {
        std::nth_element(block, block + (cap - 1), block + count,
                         [&](Index a, Index b) { return heavier(routing, a, b); });
        std::sort(block, block + cap);  // the kept, back in token order
      }
      plan.dropped += count - cap;
    }

    // Final layout: blocks of min(count, cap) rows, or exactly cap rows when padding.
    const bool pad = pads();
    Index rows = 0;
    std::vector<Index>& source = plan.source;
    for (Index e = 0; e < experts; ++e) {
      const Index kept = std::min(plan.counts[static_cast<std::size_t>(e)], cap);
      rows += pad ? std::max(kept, cap) : kept;
    }
    source.resize(static_cast<std::size_t>(rows));
    Index row = 0;
    for (Index e = 0; e < experts; ++e) {
      const Index first = plan.offsets[static_cast<std::size_t>(e)];
      const Index kept = std::min(plan.counts[static_cast<std::size_t>(e)], cap);
      const Index size = pad ? std::max(kept, cap) : kept;
      for (Index i = 0; i < size; ++i)
        source[static_cast<std::size_t>(row + i)] =
            i < kept ? order[static_cast<std::size_t>(first + i)] : Plan::no_slot;
      plan.counts[static_cast<std::size_t>(e)] = size;
      row += size;
    }
    plan.set_offsets();
    plan.slot.assign(static_cast<std::size_t>(routing.choices()), Plan::no_slot);  // now the real slot table
    for (Index r = 0; r < rows; ++r)
      if (source[static_cast<std::size_t>(r)] != Plan::no_slot)
        plan.slot[static_cast<std::size_t>(source[static_cast<std::size_t>(r)])] = r;
  }

 private:
  static std::size_t at(Index choice) { return static_cast<std::size_t>(choice); }
  static bool kept(const Plan& plan, Index choice) { return plan.slot[at(choice)] != Plan::no_slot; }
  template <class Body>
  static void for_each_token(const Plan& plan, Body body) {
    for (Index t = 0; t < plan.tokens; ++t) body(t * plan.top_k, plan.top_k);
  }

  /// Heavier weight first; the earlier choice wins a tie, so plans are deterministic.
  template <Scalar T>
  static bool heavier(const Routing<T>& routing, Index a, Index b) {
    const T wa = routing.weight[static_cast<std::size_t>(a)], wb = routing.weight[static_cast<std::size_t>(b)];
    return wa > wb || (wa == wb && a < b);
  }
};

static_assert(Dispatcher<Capacity>);

}  // namespace moekit
