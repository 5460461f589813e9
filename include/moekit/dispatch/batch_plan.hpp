#pragma once
// The plan over a batch group: over ranks, a dispatcher whose decisions depend on the whole batch
// (a capacity) plans every rank's routing together, exactly as one process would.
// docs/distributed.md
#include <cstddef>
#include <vector>

#include <moekit/core/concepts.hpp>

namespace moekit {

/// Plans the gathered routing of every rank of a batch group and keeps this rank's kept choices,
/// in token order within each expert's block. Its buffers grow to the largest batch and are
/// reused.
template <Scalar T>
class BatchPlan {
 public:
  template <Dispatcher D>
  void plan(const D& dispatcher, const BatchGroup& batch, const Routing<T>& routing, Index experts,
            Plan& plan) {
    const auto choices = static_cast<std::size_t>(routing.choices());
    packed_.resize(2 * choices);
    for (std::size_t c = 0; c < choices; ++c) {
      packed_[2 * c] = double(routing.index[c]);
      packed_[2 * c + 1] = double(routing.weight[c]);
    }
    batch.gather(packed_, gathered_, gathered_counts_);
    Index before = 0;  // choices of the ranks before this one
    for (int r = 0; r < batch.rank(); ++r) before += gathered_counts_[static_cast<std::size_t>(r)] / 2;
    const auto all = gathered_.size() / 2;
    batch_routing_.resize(static_cast<Index>(all) / routing.top_k, routing.top_k);
    for (std::size_t c = 0; c < all; ++c) {
      batch_routing_.index[c] = static_cast<Index>(gathered_[2 * c]);
      batch_routing_.weight[c] = static_cast<T>(gathered_[2 * c + 1]);
    }
    dispatcher.plan(batch_routing_, experts, batch_plan_);

    plan.reset(routing.tokens, experts, routing.top_k);
    plan.place(routing.index, [&](std::size_t c) {
      return batch_plan_.slot[static_cast<std::size_t>(before) + c] != Plan::no_slot;
    });
  }

 private:
  std::vector<double> packed_, gathered_;  // (expert, weight) of each choice: this rank's, every rank's
  std::vector<Index> gathered_counts_;
  Routing<T> batch_routing_;
  Plan batch_plan_;
};

}  // namespace moekit
