#pragma once
// Which ranks form which group, from an order string, as Megatron-Core's RankGenerator forms
// them. Pure arithmetic: no MPI here, so the layouts can be checked for any world size.
// docs/distributed.md#groups
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include <moekit/core/error.hpp>

namespace moekit {

/// Ranks laid out on a grid of named dimensions. The order string lists the dimensions from the
/// fastest-varying to the slowest: with "tp-cp-ep-dp-pp", ranks 0 and 1 differ in tp. A rank is
/// Σ_d index_d · stride_d, stride_d being the product of the sizes of the dimensions before d.
class ProcessGrid {
 public:
  struct Dimension {
    std::string name;
    int size = 1;
  };

  /// `dimensions` in the order's order; a dimension the order does not name must have size 1.
  ProcessGrid(std::string_view order, std::vector<Dimension> dimensions) {
    for (std::string_view rest = order; !rest.empty();) {
      const auto dash = rest.find('-');
      const std::string token(rest.substr(0, dash));
      const auto found = std::find_if(dimensions.begin(), dimensions.end(),
                                      [&](const Dimension& d) { return d.name == token; });
      require(found != dimensions.end(), "moekit::ProcessGrid: order '", order,
              "' names '", token, "'; expected only tp, cp, ep, dp and pp");
      require(index_of(token) < 0, "moekit::ProcessGrid: order '", order, "' names '",
              token, "' twice; expected each dimension once");
      dimensions_.push_back(*found);
      rest = dash == std::string_view::npos ? std::string_view{} : rest.substr(dash + 1);
    }
    for (const auto& d : dimensions) {
      require(d.size >= 1, "moekit::ProcessGrid: ", d.name, " = ", d.size,
              "; expected at least 1");
      if (index_of(d.name) >= 0) continue;
      require(d.size == 1, "moekit::ProcessGrid: ", d.name, " = ", d.size,
              " but the order '", order, "' does not name it; expected it in the order");
      dimensions_.push_back(d);  // a missing dimension of size 1 goes last, as Megatron-Core's
    }
  }

  int world_size() const {
    int n = 1;
    for (const auto& d : dimensions_) n *= d.size;
    return n;
  }
  int size(std::string_view name) const { return dimensions_[checked_index(name)].size; }

  /// This rank's index along one dimension.
  int coordinate(int rank, std::string_view name) const {
    int stride = 1;
    for (std::size_t i = 0; i < checked_index(name); ++i) stride *= dimensions_[i].size;
    return rank / stride % size(name);
  }

  /// Every group along the dimensions named in `mask` ("tp", "ep-dp", ...): the ranks that
  /// differ only in those dimensions, each group in increasing position along them.
  std::vector<std::vector<int>> groups(std::string_view mask) const {
    std::vector<bool> masked(dimensions_.size(), false);
    for (std::string_view rest = mask; !rest.empty();) {
      const auto dash = rest.find('-');
      masked[checked_index(rest.substr(0, dash))] = true;
      rest = dash == std::string_view::npos ? std::string_view{} : rest.substr(dash + 1);
    }
    std::vector<int> inner_sizes, inner_strides, outer_sizes, outer_strides;
    int stride = 1;
    for (std::size_t i = 0; i < dimensions_.size(); ++i) {
      (masked[i] ? inner_sizes : outer_sizes).push_back(dimensions_[i].size);
      (masked[i] ? inner_strides : outer_strides).push_back(stride);
      stride *= dimensions_[i].size;
    }
    auto product = [](const std::vector<int>& v) {
      int n = 1;
      for (int s : v) n *= s;
      return n;
    };
    auto offset = [](int index, const std::vector<int>& sizes, const std::vector<int>& strides) {
      int rank = 0;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        rank += index % sizes[i] * strides[i];
        index /= sizes[i];
      }
      return rank;
    };
    std::vector<std::vector<int>> result(static_cast<std::size_t>(product(outer_sizes)));
    for (std::size_t g = 0; g < result.size(); ++g)
      for (int r = 0; r < product(inner_sizes); ++r)
        result[g].push_back(offset(static_cast<int>(g), outer_sizes, outer_strides) +
                            offset(r, inner_sizes, inner_strides));
    return result;
  }

  /// The group along `mask` that holds `rank`.
  std::vector<int> group_of(int rank, std::string_view mask) const {
    for (auto& group : groups(mask))
      if (std::find(group.begin(), group.end(), rank) != group.end()) return group;
    fail("moekit::ProcessGrid: rank ", rank, " is outside a grid of ", world_size(),
         " ranks; expected 0 ≤ rank < ", world_size());
  }

 private:
  int index_of(std::string_view name) const {
    for (std::size_t i = 0; i < dimensions_.size(); ++i)
      if (dimensions_[i].name == name) return static_cast<int>(i);
    return -1;
  }
  std::size_t checked_index(std::string_view name) const {
    const int i = index_of(name);
    require(i >= 0, "moekit::ProcessGrid: no dimension '", name,
            "'; expected one of tp, cp, ep, dp, pp");
    return static_cast<std::size_t>(i);
  }

  std::vector<Dimension> dimensions_;
};

/// Sizes of a Megatron-Core parallel layout. dp and edp follow from the world size.
struct ParallelSizes {
  int tp = 1;   // tensor parallel (attention and the other dense layers)
  int cp = 1;   // context parallel
  int pp = 1;   // pipeline stages
  int ep = 1;   // expert parallel
  int etp = 0;  // expert tensor parallel; 0: the same as tp (Megatron-Core's default)
};

/// Parallel folding: one grid for the dense layers (tp, cp, dp, pp) and one for the experts
/// (etp, ep, edp, pp) over the same ranks and the same order, so EP may span TP, CP and DP ranks.
///   dense:  tp = TP,  cp = CP, ep = 1,  dp = W/(TP·CP·PP), pp = PP
///   expert: tp = ETP, cp = 1,  ep = EP, dp = W/(ETP·EP·PP), pp = PP
class ParallelLayout {
 public:
  ParallelLayout(int world_size, ParallelSizes sizes, std::string_view order = "tp-cp-ep-dp-pp")
      : dense_(order, dense_dimensions(world_size, sizes)),
        expert_(order, expert_dimensions(world_size, sizes)) {
    require(dense_.groups("pp") == expert_.groups("pp"), "moekit::ParallelLayout: order '",
            order, "' gives the dense and the expert grids different pipeline groups; "
            "expected pp in the same place for both (put it last)");
  }

  const ProcessGrid& dense() const { return dense_; }
  const ProcessGrid& expert() const { return expert_; }

 private:
  static int quotient(int world, int divisor, std::string_view what, std::string_view product) {
    require(world >= 1 && divisor >= 1 && world % divisor == 0, "moekit::ParallelLayout: ",
            world, " ranks are not divisible by ", product, " = ", divisor,
            "; expected a world size that is a multiple of it (", what, " = the quotient)");
    return world / divisor;
  }
  static std::vector<ProcessGrid::Dimension> dense_dimensions(int world, ParallelSizes s) {
    check_positive(s);
    return {{"tp", s.tp}, {"cp", s.cp}, {"ep", 1},
            {"dp", quotient(world, s.tp * s.cp * s.pp, "dp", "tp·cp·pp")}, {"pp", s.pp}};
  }
  static std::vector<ProcessGrid::Dimension> expert_dimensions(int world, ParallelSizes s) {
    const int etp = s.etp == 0 ? s.tp : s.etp;
    return {{"tp", etp}, {"cp", 1}, {"ep", s.ep},
            {"dp", quotient(world, etp * s.ep * s.pp, "edp", "etp·ep·pp")}, {"pp", s.pp}};
  }
  static void check_positive(const ParallelSizes& s) {
    require(s.tp >= 1 && s.cp >= 1 && s.pp >= 1 && s.ep >= 1 && s.etp >= 0,
            "moekit::ParallelLayout: tp = ", s.tp, ", cp = ", s.cp, ", pp = ", s.pp,
            ", ep = ", s.ep, ", etp = ", s.etp,
            "; expected each at least 1 (etp may be 0: the same as tp)");
  }

  ProcessGrid dense_, expert_;
};

}  // namespace moekit
