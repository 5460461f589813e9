#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/random.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/token_loops.hpp>

namespace moekit {

/// Hash layers (Roller et al. 2021): each token goes to one expert, a fixed function of its id
/// (its index in the vocabulary), with weight 1: y_t = expert_{h(id_t)}(x_t). The router has no
/// scores and no parameters; the layer is told each batch's ids by set_token_ids(ids).
/// docs/policies/router.md#hash
///
/// h is the paper's random hash by default: a fixed uniform draw from the E experts per id, from
/// `seed` (balanced over ids: each expert gets 1/E of them, whatever the ids are). Or a table
/// id → expert (`table`), e.g. the paper's balanced assignment from token frequencies,
/// Hash::balanced_table(counts, experts); an id must then be below the table's size.
struct Hash {
  using policy_kind = router_kind;
  static constexpr int top_k = 1;
  static constexpr bool scores = false;  // no router.weight, no gradient: what picks is the id
  static constexpr std::string_view name = "Hash";

  struct Options {
    std::uint64_t seed = 0;    // of the random hash
    std::vector<Index> table{};  // id → expert; empty: the random hash
  };
  Options options{};

  void validate(const LayerShape& shape) const {
    for (std::size_t id = 0; id < options.table.size(); ++id)
      require(options.table[id] >= 0 && options.table[id] < shape.experts, "moekit::Hash: table[", id, "] = ",
              options.table[id], " but the layer has ", shape.experts, " experts; expected 0 <= expert < ",
              shape.experts);
  }

  /// Each id must be one the hash maps: >= 0, and below the table's size if there is one.
  void check_token_ids(std::span<const Index> ids) const {
    const auto limit = static_cast<Index>(options.table.size());
    for (std::size_t t = 0; t < ids.size(); ++t) {
      if (limit == 0)
        require(ids[t] >= 0, "moekit::Hash: token ", t, " has id ", ids[t], "; expected an id >= 0");
      else
        require(ids[t] >= 0 && ids[t] < limit, "moekit::Hash: token ", t, " has id ", ids[t],
                "; expected 0 <= id < the table's size, ", limit);
    }
  }

  /// The expert of one id.
  Index expert_of(Index id, Index experts) const {
    if (!options.table.empty()) return options.table[static_cast<std::size_t>(id)];
    // The high word of a uniform 64-bit draw times E: each expert's share of the draws is 1/E
    // to within E / 2⁶⁴ (Lemire's multiply-shift), with no modulo bias.
    const std::uint64_t bits = detail::mix64(detail::mix64(options.seed + 0x9E3779B97F4A7C15ull) ^
                                             static_cast<std::uint64_t>(id));
    return static_cast<Index>((static_cast<unsigned __int128>(bits) * static_cast<std::uint64_t>(experts)) >> 64);
  }

  /// Each token's expert from its id (context.token_ids), weight 1.                        [T,1]
  template <Scalar T>
  void select(const RouterContext& context, Index experts, Routing<T>& out) const {
    const auto tokens = static_cast<Index>(context.token_ids.size());
    out.resize(tokens, top_k);
    for_each_token(tokens, [&](Index t) {
      const auto c = static_cast<std::size_t>(t);
      out.index[c] = expert_of(context.token_ids[c], experts);
      out.weight[c] = T(1);
    });
  }

  /// The paper's balanced assignment: ids by descending count (ties by id), each to the expert
  /// with the fewest tokens so far (ties to the lower expert), so that tokens with these counts
  /// spread as evenly as one expert per id allows. counts[id]: how often id occurs in a corpus.
  static std::vector<Index> balanced_table(std::span<const double> counts, Index experts) {
    require(experts >= 1, "moekit::Hash::balanced_table: experts = ", experts, "; expected at least 1");
    for (std::size_t id = 0; id < counts.size(); ++id)
      require(counts[id] >= 0 && std::isfinite(counts[id]), "moekit::Hash::balanced_table: counts[", id, "] = ",
              counts[id], "; expected a finite count >= 0");
    std::vector<Index> order(counts.size());
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
      return counts[static_cast<std::size_t>(a)] > counts[static_cast<std::size_t>(b)];
    });
    std::vector<double> load(static_cast<std::size_t>(experts), 0.0);
    std::vector<Index> table(counts.size());
    for (const Index id : order) {
      const auto emptiest = std::min_element(load.begin(), load.end()) - load.begin();
      table[static_cast<std::size_t>(id)] = emptiest;
      load[static_cast<std::size_t>(emptiest)] += counts[static_cast<std::size_t>(id)];
    }
    return table;
  }
};

static_assert(Router<Hash>);

}  // namespace moekit
