#pragma once
// Hugging Face MoE blocks saved as safetensors (the layout of tests/fixtures/hf): what their
// metadata says about routing, whether moekit can build that block yet, and how close two
// tensors are.
#include <algorithm>
#include <cmath>
#include <ranges>
#include <span>
#include <string>
#include <vector>

#include <moekit/core/routing.hpp>
#include <moekit/router/top_k.hpp>
#include <moekit/io/safetensors.hpp>

namespace moekit::io {

/// A fixture's block, read from its __metadata__.
struct HfBlock {
  std::string family;
  Index tokens = 0, hidden = 0, ffn = 0, experts = 0;
  int top_k = 0;
  ScoreFn score = ScoreFn::softmax;
  bool normalize = false;
  double scale = 1.0;
  std::string shared_expert = "none";
  int groups = 1, groups_kept = 1;  // n_group, topk_group: group-limited top-k
  std::string group_score = "sum of top-2 biased scores in group";
  bool selection_bias = false;  // router.bias: AuxFree's bias, loaded with the layer

  /// The group scores moekit implements, by the metadata's words (TopK's GroupScore).
  static constexpr std::string_view top2_sum_words = "sum of top-2 biased scores in group",
                                    max_words = "max score in group";

  static HfBlock from(const SafeTensors& file) {
    auto number = [&](const std::string& key) {
      const std::string v = file.metadata(key, "");
      moekit::require(!v.empty(), "moekit::HfBlock: the fixture's __metadata__ has no '", key,
                      "'; expected tokens, hidden, ffn, experts and topk");
      return std::stoll(v);
    };
    HfBlock b;
    b.family = file.metadata("family", "unknown");
    b.tokens = number("tokens");
    b.hidden = number("hidden");
    b.ffn = number("ffn");
    b.experts = number("experts");
    b.top_k = static_cast<int>(number("topk"));
    const std::string score = file.metadata("score", "softmax");
    moekit::require(score == "softmax" || score == "sigmoid", "moekit::HfBlock: score = '", score,
                    "'; expected softmax or sigmoid");
    b.score = score == "softmax" ? ScoreFn::softmax : ScoreFn::sigmoid;
    b.normalize = file.metadata("normalize_topk", "false") == "true";
    b.scale = std::stod(file.metadata("routed_scaling_factor", "1"));
    b.shared_expert = file.metadata("shared_expert", "none");
    b.groups = static_cast<int>(std::stoll(file.metadata("n_group", "1")));
    b.groups_kept = static_cast<int>(std::stoll(file.metadata("topk_group", "1")));
    b.group_score = file.metadata("group_score", std::string(top2_sum_words));
    b.selection_bias = file.contains("router.bias");
    return b;
  }

  /// A [tokens, hidden] tensor of the file (x, y, dx, dy), its shape checked against the metadata.
  template <Scalar T>
  Matrix<T> activations(const SafeTensors& file, std::string_view name) const {
    const auto& info = file.info(name);
    moekit::require(info.shape == std::vector<Index>{tokens, hidden}, "moekit::HfBlock: tensor '",
                    name, "' is ", shape_string(info.shape), "; expected [", tokens, ",",
                    hidden, "] from the metadata's tokens and hidden");
    const auto values = file.values<T>(name);
    return ConstMatrixMap<T>(values.data(), tokens, hidden);
  }

  /// TopK's group options for this block (group-limited top-k when groups > 1).
  GroupScore group_rule() const { return group_score == max_words ? GroupScore::max : GroupScore::top2_sum; }

  /// What this block needs that moekit does not have yet, each named by its metadata key and
  /// value; empty when it can be built.
  std::vector<std::string> unsupported() const {
    std::vector<std::string> missing;
    if (shared_expert != "none") missing.push_back("shared_expert = '" + shared_expert + "' (a shared expert)");
    if (groups > 1 && group_score != top2_sum_words && group_score != max_words)
      missing.push_back("group_score = '" + group_score + "'");
    return missing;
  }
};

/// max |a − b| over max |b|: the error relative to the reference tensor b's largest magnitude.
template <std::ranges::random_access_range A, std::ranges::random_access_range B>
double relative_error(const A& a, const B& b) {
  const auto n = static_cast<std::size_t>(std::ranges::size(a));
  moekit::require(n == static_cast<std::size_t>(std::ranges::size(b)), "moekit::relative_error: ",
                  n, " values against ", std::ranges::size(b), "; expected the same number");
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

}  // namespace moekit::io
