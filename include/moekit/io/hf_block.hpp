#pragma once
// A Hugging Face MoE block as moekit builds it: sizes, routing rule and shared expert, read from
// a fixture's metadata (tests/fixtures/hf) or from a model folder's config.json (hf_model.hpp);
// what of it moekit does not do; the MoELayer it maps to; and how close two results are.
#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <map>
#include <ranges>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/routing.hpp>
#include <moekit/io/safetensors.hpp>
#include <moekit/moekit.hpp>

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
  Index shared_ffn = 0;  // the shared expert's width, from shared.up's shape
  int groups = 1, groups_kept = 1;  // n_group, topk_group: group-limited top-k
  std::string group_score = "sum of top-2 biased scores in group";
  bool selection_bias = false;  // router.bias: AuxFree's bias, loaded with the layer
  bool weight_at_input = false;  // Llama 4: the weights scale the experts' input
  bool logit_bias = false;       // GPT-OSS: router.logit_bias added to the logits
  std::string expert_unit = "swiglu";  // the routed experts' unit: swiglu_words or clamped_biased_words
  std::vector<std::pair<std::string, std::string>> unknown;  // metadata keys of conventions moekit does not know

  /// The metadata's words for what moekit implements: group scores (TopK's GroupScore), shared
  /// experts (Shared<SharedGate>), the expert layout and the selection bias.
  static constexpr std::string_view top2_sum_words = "sum of top-2 biased scores in group",
                                    max_words = "max score in group",
                                    shared_none_words = "none", shared_plain_words = "swiglu, unscaled",
                                    shared_sigmoid_words = "swiglu, scaled by sigmoid(x . shared.gate_proj_weight)",
                                    layout_words = "gu_halves",
                                    selection_bias_words = "router.bias added for selection only",
                                    swiglu_words = "swiglu",
                                    clamped_biased_words = "clamped swiglu (limit 7, alpha 1.702) with biases";
  /// Every metadata key a fixture may have: the conventions above, the sizes, and where its
  /// numbers came from. Any other key is a convention moekit does not know, and is refused.
  static constexpr std::array known_keys{
      "family", "tokens", "hidden", "ffn", "experts", "topk", "score", "normalize_topk", "routed_scaling_factor",
      "shared_expert", "n_group", "topk_group", "group_score", "selection_bias", "layout_from",
      "transformers", "torch", "grad_source", "y_source", "max_abs_err_canonical_vs_transformers"};

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
    if (file.contains("shared.up")) b.shared_ffn = file.info("shared.up").shape.front();
    for (const auto& [key, value] : file.metadata())
      if (std::ranges::find(known_keys, key) == known_keys.end()) b.unknown.emplace_back(key, value);
    b.conventions_ = file.metadata();
    return b;
  }

  /// The layer's sizes.
  LayerConfig config() const { return {.hidden = hidden, .ffn = ffn, .experts = experts, .shared_ffn = shared_ffn}; }

  /// The block's router (K = top_k).
  template <int K>
  TopK<K> router() const {
    return TopK<K>{{.score = score, .normalize = normalize, .scale = scale, .groups = groups,
                    .groups_kept = groups_kept, .group_score = group_rule(),
                    .weight_at = weight_at_input ? WeightAt::input : WeightAt::output, .logit_bias = logit_bias}};
  }

  /// "MoELayer<TopK<8>, AuxFree, Shared<>>": the type with_layer() builds (and its scalar).
  std::string layer_type() const {
    std::string type = "MoELayer<TopK<" + std::to_string(top_k) + ">, " + (selection_bias ? "AuxFree" : "NoBalance");
    if (clamped_biased()) type += ", GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>";
    if (has_shared()) type += shared_gate() == SharedGate::sigmoid ? ", Shared<SharedGate::sigmoid>" : ", Shared<>";
    type += '>';
    if (weight_at_input) type += " with TopK's weight_at = WeightAt::input";
    if (logit_bias) type += " with TopK's logit_bias = true";
    return type;
  }

  /// The top-k values with_layer() builds: those of the families moekit reads (Llama 4's 1,
  /// Mixtral's 2, GPT-OSS's 4, DeepSeek-V2's 6; 8 for DeepSeek-V3, Qwen3-MoE and OLMoE).
  using layer_top_ks = std::integer_sequence<int, 1, 2, 4, 6, 8>;

  /// Calls f(layer) with a layer of the type this block maps to, in T, with its sizes and
  /// router (not yet loaded): MoELayer<TopK<K>, AuxFree or NoBalance, Dropless, GroupedGemm,
  /// the shared expert, T>, or with GPT-OSS's experts MoELayer<TopK<K>, NoBalance, Dropless,
  /// GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>, T>; with a precision P, its experts'
  /// products (routed and shared) in P, as MoELayer<…, bf16> or MoELayer<…, int8> would have them.
  /// Returns what f returns.
  template <Scalar T, Precision P = Precision::scalar, class F>
  auto with_layer(F&& f) const {
    static_assert(P == Precision::scalar || std::is_same_v<T, float>,
                  "moekit::HfBlock::with_layer: bf16 and int8 layers are float layers; pass float");
    return with_k<T, P>(std::forward<F>(f), layer_top_ks{});
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

  /// The shared expert's gate (meaningful when has_shared()).
  SharedGate shared_gate() const { return shared_expert == shared_sigmoid_words ? SharedGate::sigmoid : SharedGate::none; }
  bool has_shared() const { return shared_expert != shared_none_words; }
  /// Whether the routed experts are GPT-OSS's: clamped SwiGLU with biases.
  bool clamped_biased() const { return expert_unit == clamped_biased_words; }

  /// What this block needs that moekit does not do, each named by its metadata key and value;
  /// empty when it can be built.
  std::vector<std::string> unsupported() const {
    std::vector<std::string> missing;
    auto refuse = [&](std::string_view key, std::string_view value, std::string_view why) {
      std::string line(key);
      line += " = '";
      line += value;
      line += "' (";
      line += why;
      line += ')';
      missing.push_back(std::move(line));
    };
    if (shared_expert != shared_none_words && shared_expert != shared_plain_words &&
        shared_expert != shared_sigmoid_words)
      refuse("shared_expert", shared_expert, "a shared expert of another form");
    if (has_shared() && shared_ffn == 0) refuse("shared_expert", shared_expert, "but no tensor shared.up");
    if (groups > 1 && group_score != top2_sum_words && group_score != max_words)
      refuse("group_score", group_score, "a group score of another form");
    if (const auto layout = metadata("layout_from", std::string(layout_words)); layout != layout_words)
      refuse("layout_from", layout, "an expert layout of another form");
    if (const auto bias = metadata("selection_bias", std::string(selection_bias_words)); bias != selection_bias_words)
      refuse("selection_bias", bias, "a selection bias of another form");
    if (expert_unit != swiglu_words && !clamped_biased()) refuse("expert_unit", expert_unit, "an expert of another form");
    if (clamped_biased() && (has_shared() || selection_bias))
      refuse("expert_unit", expert_unit, "biased experts beside a shared expert or a selection bias");
    for (const auto& [key, value] : unknown) refuse(key, value, "a convention moekit does not know");
    return missing;
  }

  /// The fixture's name of a layer parameter: the same but for the shared expert's gate.
  static std::string tensor_name(std::string_view parameter) {
    return parameter == "shared.output_gate" ? "shared.gate_proj_weight" : std::string(parameter);
  }

  /// Loads `layer`'s parameters (and AuxFree's router.bias) from the fixture's tensors.
  template <class Layer>
  void load(Layer& layer, const SafeTensors& file, const std::filesystem::path& path) const {
    SafeTensors tensors;
    for (const auto& p : layer.parameters()) {
      const std::string name = tensor_name(p.name());
      tensors.add(p.name(), file.info(name).shape, std::span<const double>(file.values<double>(name)));
    }
    if (file.contains("router.bias"))
      tensors.add("router.bias", file.info("router.bias").shape, std::span<const double>(file.values<double>("router.bias")));
    layer.load(tensors, path);
  }

 private:
  template <Scalar T, Precision P, class F, int K, int... Ks>
  auto with_k(F&& f, std::integer_sequence<int, K, Ks...>) const {
    if constexpr (sizeof...(Ks) > 0) {
      if (top_k != K) return with_k<T, P>(std::forward<F>(f), std::integer_sequence<int, Ks...>{});
    } else {
      moekit::require(top_k == K, "moekit::HfBlock: top-k = ", top_k, " (", family,
                      "); expected 1, 2, 4, 6 or 8, the values moekit builds layers for");
    }
    if (clamped_biased())
      return build<T, P, K, NoBalance, NoSharedExpert, GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>>(
          std::forward<F>(f));
    return selection_bias ? with_shared<T, P, K, AuxFree>(std::forward<F>(f))
                          : with_shared<T, P, K, NoBalance>(std::forward<F>(f));
  }

  template <Scalar T, Precision P, int K, class Balancer, class F>
  auto with_shared(F&& f) const {
    if (!has_shared()) return build<T, P, K, Balancer, NoSharedExpert>(std::forward<F>(f));
    if (shared_gate() == SharedGate::sigmoid)
      return build<T, P, K, Balancer, Shared<SharedGate::sigmoid>>(std::forward<F>(f));
    return build<T, P, K, Balancer, Shared<>>(std::forward<F>(f));
  }

  template <Scalar T, Precision P, int K, class Balancer, class SharedPolicy, class Experts = GroupedGemm, class F>
  auto build(F&& f) const {
    BasicMoELayer<T, TopK<K>, Balancer, Dropless, typename moekit::detail::with_precision<Experts, P>::type, SingleProcess,
                  typename moekit::detail::with_precision<SharedPolicy, P>::type>
        layer(config(), router<K>());
    return f(layer);
  }

  std::string metadata(const std::string& key, const std::string& fallback) const {
    const auto it = conventions_.find(key);
    return it == conventions_.end() ? fallback : it->second;
  }
  std::map<std::string, std::string> conventions_;  // the file's metadata
};

/// How far a layer's routing is from the fixture's topk.index and topk.weight, token by token
/// and matched by expert (transformers' top-k need not be sorted).
struct RoutingDifference {
  long mismatches = 0;       // (token, expert) choices of the fixture the layer did not make
  double weight_error = 0;   // max |Δw| over max |w| of the choices both made
};

template <Scalar T>
RoutingDifference routing_difference(const Routing<T>& routing, const SafeTensors& file) {
  const auto index = file.integers("topk.index");
  const auto weight = file.values<double>("topk.weight");
  const auto k = static_cast<std::size_t>(routing.top_k);
  moekit::require(index.size() == routing.index.size() && weight.size() == index.size(),
                  "moekit::routing_difference: the fixture has ", index.size(), " choices; expected ",
                  routing.index.size(), " like the layer's routing");
  RoutingDifference d;
  double diff = 0, scale = 0;
  for (std::size_t c = 0; c < index.size(); ++c) {
    scale = std::max(scale, std::abs(weight[c]));
    const std::size_t first = c / k * k;
    bool found = false;
    for (std::size_t j = first; j < first + k; ++j) {
      if (routing.index[j] != index[c]) continue;
      found = true;
      diff = std::max(diff, std::abs(static_cast<double>(routing.weight[j]) - weight[c]));
    }
    d.mismatches += !found;
  }
  d.weight_error = scale > 0 ? diff / scale : diff;
  return d;
}

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
