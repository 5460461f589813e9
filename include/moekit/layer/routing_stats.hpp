#pragma once
// What a forward pass did with its tokens, for the caller to read or log.
#include <algorithm>
#include <cstdint>
#include <ostream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <moekit/core/routing.hpp>
#include <moekit/io/detail/json.hpp>

namespace moekit {

/// Load statistics of one forward pass. docs/getting_started.md#routing-statistics
struct RoutingStats {
  Index tokens = 0;
  Index choices = 0;                     // choices the router made: tokens · K, less those it left empty
  Index dropped = 0;                     // choices that got no row (capacity)
  std::vector<Index> tokens_per_expert;  // [E] kept choices per expert; padding rows not counted
  double max_over_mean = 0;              // largest load over the mean load; 1 is perfectly even
  std::vector<std::pair<std::string, double>> balance_terms;  // each balancer term's value

  /// From a plan's kept choices; `load` is the per-expert count of kept choices.
  static RoutingStats from(const Plan& plan, std::span<const Index> load) {
    RoutingStats s;
    s.tokens = plan.tokens;
    s.dropped = plan.dropped;
    s.tokens_per_expert.assign(load.begin(), load.end());
    Index total = 0, largest = 0;
    for (Index n : load) total += n, largest = std::max(largest, n);
    s.choices = total + plan.dropped;
    if (total > 0) s.max_over_mean = double(largest) * double(load.size()) / double(total);
    return s;
  }
};

/// Writes one JSON object per forward pass to a stream: attach it to a layer with
/// `layer.observe(std::ref(logger))`.
///   {"step":1,"tokens":256,"choices":512,"dropped":0,"max_over_mean":1.31,"tokens_per_expert":[...],"AuxLoss":0.0101}
class JsonLinesLogger {
 public:
  explicit JsonLinesLogger(std::ostream& out) : out_(out) {}

  void operator()(const RoutingStats& s) {
    out_ << "{\"step\":" << ++step_ << ",\"tokens\":" << s.tokens << ",\"choices\":" << s.choices
         << ",\"dropped\":" << s.dropped << ",\"max_over_mean\":" << s.max_over_mean
         << ",\"tokens_per_expert\":[";
    for (std::size_t e = 0; e < s.tokens_per_expert.size(); ++e) out_ << (e ? "," : "") << s.tokens_per_expert[e];
    out_ << "]";
    for (const auto& [name, value] : s.balance_terms) out_ << "," << io::detail::json_quote(name) << ":" << value;
    out_ << "}\n";
  }

  std::int64_t steps() const { return step_; }

 private:
  std::ostream& out_;
  std::int64_t step_ = 0;
};

}  // namespace moekit
