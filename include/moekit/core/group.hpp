#pragma once
// The ranks whose tokens make up one batch. A layer split over ranks must decide exactly what
// one process would decide for the whole batch, so the policies that need batch-wide numbers
// (AuxLoss's counts, Sinkhorn's column sums, AuxFree's load, a capacity's drop decisions) take
// them from here. In one process the group is that process alone and every call is a no-op.
#include <span>
#include <vector>

#include <moekit/core/tensor.hpp>

namespace moekit {

/// The token shards of a batch: one per rank of the data-parallel group. docs/distributed.md
class BatchGroup {
 public:
  virtual ~BatchGroup() = default;

  /// Ranks whose tokens form the batch (D), and this rank's place among them.
  virtual int size() const { return 1; }
  virtual int rank() const { return 0; }

  /// Element-wise sum over the group, in place. Summed in rank order, so every rank gets the
  /// same bits and the result does not depend on how the collective is implemented.
  virtual void sum(std::span<double>) const {}

  /// Every rank's values (counts may differ), concatenated in rank order; `counts` gets how
  /// many each rank gave.
  virtual void gather(std::span<const double> mine, std::vector<double>& all,
                      std::vector<Index>& counts) const {
    all.assign(mine.begin(), mine.end());
    counts.assign(1, static_cast<Index>(mine.size()));
  }
};

/// The group of a layer that lives in one process.
inline const BatchGroup& single_process_batch() {
  static const BatchGroup group;
  return group;
}

}  // namespace moekit
