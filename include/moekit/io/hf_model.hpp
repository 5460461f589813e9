#pragma once
// Hugging Face model folders as they are downloaded: config.json, and model.safetensors or
// model.safetensors.index.json with its shards. HfModel finds the family from model_type and
// which layers are MoE, describes a layer's block (HfBlock: sizes, routing rule, shared expert)
// and reads that block's tensors under moekit's names, converting BF16, F16, F32 and F64 and
// reading no byte of any other tensor. write_block() is the reverse. docs/models.md#folders
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/error.hpp>
#include <moekit/io/detail/json.hpp>
#include <moekit/io/hf_block.hpp>
#include <moekit/io/safetensors.hpp>

namespace moekit::io {

/// config.json: values by key, each with the family's default where transformers has one.
class HfConfig {
 public:
  static HfConfig read(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    require(static_cast<bool>(in), "moekit::HfModel: '", path.string(),
            "' cannot be opened; expected a Hugging Face model folder with a config.json");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    HfConfig config;
    config.path_ = path;
    config.root_ = detail::JsonParser(text, path.string(), "moekit::HfModel", "JSON document").parse();
    require(config.root_.kind == detail::Json::Kind::object, "moekit::HfModel: '", path.string(),
            "' is not a JSON object; expected a model's config.json");
    return config;
  }

  const std::filesystem::path& path() const { return path_; }
  bool contains(std::string_view key) const { return find(key) != nullptr; }

  std::string string(std::string_view key, std::optional<std::string> fallback = {}) const {
    const auto* v = value(key, fallback.has_value());
    if (!v) return *fallback;
    expect(*v, detail::Json::Kind::string, key, "a string");
    return v->text;
  }
  Index integer(std::string_view key, std::optional<Index> fallback = {}) const {
    const auto* v = value(key, fallback.has_value());
    if (!v) return *fallback;
    expect(*v, detail::Json::Kind::number, key, "an integer");
    require(v->text.find_first_not_of("-0123456789") == std::string::npos && v->text.size() < 19,
            "moekit::HfModel: '", path_.string(), "' has ", key, " = ", v->text, "; expected an integer");
    return std::stoll(v->text);
  }
  double number(std::string_view key, std::optional<double> fallback = {}) const {
    const auto* v = value(key, fallback.has_value());
    if (!v) return *fallback;
    expect(*v, detail::Json::Kind::number, key, "a number");
    return std::stod(v->text);
  }
  bool boolean(std::string_view key, std::optional<bool> fallback = {}) const {
    const auto* v = value(key, fallback.has_value());
    if (!v) return *fallback;
    expect(*v, detail::Json::Kind::boolean, key, "true or false");
    return v->text == "true";
  }
  /// A list of integers (mlp_only_layers); empty when absent.
  std::vector<Index> integers(std::string_view key) const {
    std::vector<Index> out;
    const auto* v = find(key);
    if (!v || v->kind == detail::Json::Kind::null) return out;
    expect(*v, detail::Json::Kind::array, key, "a list of integers");
    for (const auto& item : v->items) {
      expect(item, detail::Json::Kind::number, key, "a list of integers");
      out.push_back(std::stoll(item.text));
    }
    return out;
  }

 private:
  /// The key at the top, else in text_config (a multimodal model's language model: Llama 4).
  const detail::Json* find(std::string_view key) const {
    const detail::Json* text = nullptr;
    for (const auto& [k, v] : root_.members) {
      if (k == key) return &v;
      if (k == "text_config" && v.kind == detail::Json::Kind::object) text = &v;
    }
    if (text)
      for (const auto& [k, v] : text->members)
        if (k == key) return &v;
    return nullptr;
  }
  /// The value of `key`; nullptr when it is absent (or null) and has a default.
  const detail::Json* value(std::string_view key, bool has_default) const {
    const auto* v = find(key);
    if (v && v->kind != detail::Json::Kind::null) return v;
    require(has_default, "moekit::HfModel: '", path_.string(), "' has no ", key,
            "; expected it in a model of this family");
    return nullptr;
  }
  void expect(const detail::Json& v, detail::Json::Kind kind, std::string_view key, std::string_view what) const {
    require(v.kind == kind, "moekit::HfModel: '", path_.string(), "' has ", key, " = ", v.text.empty() ? "…" : v.text,
            "; expected ", what);
  }

  std::filesystem::path path_;
  detail::Json root_;
};

/// How a family stores its experts' gate and up projections.
enum class HfGateUp {
  separate,     // one tensor per expert and projection, [F,H] (`{e}` in the names)
  halves,       // one [E,H,2F] for all experts (x · W: transposed), gate in the first F columns,
                // and down one [E,F,H] (Llama 4)
  interleaved,  // the same, gate in the even columns and up in the odd ones, and their biases
                // [E,2F] likewise (GPT-OSS)
};

/// A family's tensor names inside an MoE layer (after its layer prefix), "{e}" for the expert.
/// An empty name: the family has no such tensor. With fused gate and up projections, `gate`
/// names the one tensor of both, and `gate_bias` that of their biases.
struct HfTensorNames {
  std::string_view router = {}, logit_bias = {}, selection_bias = {}, gate = {}, up = {}, down = {}, gate_bias = {},
                   down_bias = {}, shared_gate = {}, shared_up = {}, shared_down = {}, shared_output_gate = {};
  HfGateUp gate_up = HfGateUp::separate;
};

/// One family: how config.json sizes its MoE block, which layers are MoE, and its tensor names.
/// docs/models.md holds the routing rule each family's row reads here.
struct HfFamily {
  std::string_view model_type;
  HfTensorNames names;
  std::string_view layer_prefix;  // before N: "model.layers.", or Llama 4's "language_model.model.layers."
  HfBlock (*block)(const HfConfig&);
  /// Whether layer n is MoE; else why not (the config keys that make it dense).
  std::optional<std::string> (*dense_because)(const HfConfig&, Index n);
};

namespace detail {

inline HfBlock hf_sizes(const HfConfig& c, std::string_view family, std::string_view experts_key,
                        std::string_view ffn_key) {
  HfBlock b;
  b.family = family;
  b.hidden = c.integer("hidden_size");
  b.experts = c.integer(experts_key);
  b.ffn = c.integer(ffn_key);
  b.top_k = static_cast<int>(c.integer("num_experts_per_tok"));
  return b;
}

inline std::optional<std::string> hf_every_layer(const HfConfig&, Index) { return std::nullopt; }

/// Qwen2-MoE, Qwen3-MoE: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer.
inline std::optional<std::string> hf_qwen_dense(const HfConfig& c, Index n) {
  const auto only = c.integers("mlp_only_layers");
  if (std::ranges::find(only, n) != only.end()) return "it is in mlp_only_layers";
  const Index step = c.integer("decoder_sparse_step", 1);
  if (step < 1 || (n + 1) % step != 0) return "decoder_sparse_step = " + std::to_string(step);
  return std::nullopt;
}

/// DeepSeek-V2/V3: MoE from first_k_dense_replace on, every moe_layer_freq-th layer.
inline std::optional<std::string> hf_deepseek_dense(const HfConfig& c, Index n) {
  const Index first = c.integer("first_k_dense_replace", 0), every = c.integer("moe_layer_freq", 1);
  if (n < first) return "first_k_dense_replace = " + std::to_string(first);
  if (every < 1 || n % every != 0) return "moe_layer_freq = " + std::to_string(every);
  return std::nullopt;
}

inline HfBlock hf_mixtral(const HfConfig& c) {
  HfBlock b = hf_sizes(c, "mixtral", "num_local_experts", "intermediate_size");
  b.normalize = true;
  return b;
}

/// Qwen2-MoE's, Qwen3-MoE's and OLMoE's router: softmax, top-K, renormalised if norm_topk_prob.
inline HfBlock hf_qwen(const HfConfig& c, std::string_view family, std::string_view ffn_key, bool normalize) {
  // num_experts in the released configs; recent transformers saves it as num_local_experts
  HfBlock b = hf_sizes(c, family, c.contains("num_experts") ? "num_experts" : "num_local_experts", ffn_key);
  b.normalize = c.boolean("norm_topk_prob", normalize) && b.top_k > 1;
  return b;
}

inline HfBlock hf_qwen2_moe(const HfConfig& c) {
  HfBlock b = hf_qwen(c, "qwen2_moe", "moe_intermediate_size", false);
  b.shared_ffn = c.integer("shared_expert_intermediate_size");
  b.shared_expert = HfBlock::shared_sigmoid_words;
  return b;
}

inline HfBlock hf_deepseek(const HfConfig& c, std::string_view family) {
  HfBlock b = hf_sizes(c, family, "n_routed_experts", "moe_intermediate_size");
  if (const Index shared = c.integer("n_shared_experts", 0); shared > 0) {
    b.shared_ffn = shared * b.ffn;
    b.shared_expert = HfBlock::shared_plain_words;
  }
  return b;
}

/// DeepSeek-V2: softmax; greedy or group_limited_greedy (groups by their best score); weights × the
/// scaling factor, never renormalised (as transformers, which ignores norm_topk_prob: refused).
inline HfBlock hf_deepseek_v2(const HfConfig& c) {
  HfBlock b = hf_deepseek(c, "deepseek_v2");
  b.scale = c.number("routed_scaling_factor", 1.0);
  const std::string method = c.string("topk_method", "greedy");
  if (method == "group_limited_greedy") {
    b.groups = static_cast<int>(c.integer("n_group"));
    b.groups_kept = static_cast<int>(c.integer("topk_group"));
    b.group_score = HfBlock::max_words;
  } else if (method != "greedy") {
    b.unknown.emplace_back("topk_method", method);
  }
  if (c.boolean("norm_topk_prob", false)) b.unknown.emplace_back("norm_topk_prob", "true");
  return b;
}

/// DeepSeek-V3: sigmoid; selection biased by e_score_correction_bias (AuxFree's router.bias);
/// groups by their top-2 sum; weights from the unbiased scores, renormalised, × the factor.
inline HfBlock hf_deepseek_v3(const HfConfig& c) {
  HfBlock b = hf_deepseek(c, "deepseek_v3");
  b.score = ScoreFn::sigmoid;
  b.normalize = c.boolean("norm_topk_prob", true);
  b.scale = c.number("routed_scaling_factor", 2.5);
  b.groups = static_cast<int>(c.integer("n_group", 8));
  b.groups_kept = static_cast<int>(c.integer("topk_group", 4));
  b.selection_bias = true;
  if (const std::string method = c.string("topk_method", "noaux_tc"); method != "noaux_tc")
    b.unknown.emplace_back("topk_method", method);
  if (const std::string score = c.string("scoring_func", "sigmoid"); score != "sigmoid")
    b.unknown.emplace_back("scoring_func", score);
  return b;
}

/// Llama 4: sigmoid of the top-K logits (K = 1), each weight scaling the expert's input; a shared
/// expert of the experts' width, unscaled. MoE layers: moe_layers, else every
/// interleave_moe_layer_step-th.
inline HfBlock hf_llama4(const HfConfig& c) {
  HfBlock b = hf_sizes(c, "llama4", "num_local_experts", "intermediate_size");
  b.score = ScoreFn::sigmoid;
  b.weight_at_input = true;
  b.shared_ffn = b.ffn;
  b.shared_expert = HfBlock::shared_plain_words;
  return b;
}

/// GPT-OSS: softmax over the top-K of x·Wᵀ + b; experts with biases and the clamped SwiGLU
/// (swiglu_limit 7). Every layer is MoE.
inline HfBlock hf_gpt_oss(const HfConfig& c) {
  HfBlock b = hf_sizes(c, "gpt_oss", "num_local_experts", "intermediate_size");
  b.normalize = b.top_k > 1;  // a softmax over the K is the softmax over all, renormalised over the K
  b.logit_bias = true;
  b.expert_unit = HfBlock::clamped_biased_words;
  if (const double limit = c.number("swiglu_limit", 7.0); limit != 7.0)
    b.unknown.emplace_back("swiglu_limit", (std::ostringstream() << limit).str());
  return b;
}

inline std::optional<std::string> hf_llama4_dense(const HfConfig& c, Index n) {
  if (c.contains("moe_layers")) {
    const auto layers = c.integers("moe_layers");
    if (std::ranges::find(layers, n) == layers.end()) return "it is not in moe_layers";
    return std::nullopt;
  }
  const Index step = c.integer("interleave_moe_layer_step", 1);
  if (step < 1 || (n + 1) % step != 0) return "interleave_moe_layer_step = " + std::to_string(step);
  return std::nullopt;
}

constexpr HfTensorNames hf_llama4_names{.router = "feed_forward.router.weight",
                                        .gate = "feed_forward.experts.gate_up_proj",
                                        .down = "feed_forward.experts.down_proj",
                                        .shared_gate = "feed_forward.shared_expert.gate_proj.weight",
                                        .shared_up = "feed_forward.shared_expert.up_proj.weight",
                                        .shared_down = "feed_forward.shared_expert.down_proj.weight",
                                        .gate_up = HfGateUp::halves};

constexpr HfTensorNames hf_mlp_names{.router = "mlp.gate.weight",
                                     .gate = "mlp.experts.{e}.gate_proj.weight",
                                     .up = "mlp.experts.{e}.up_proj.weight",
                                     .down = "mlp.experts.{e}.down_proj.weight"};

constexpr HfTensorNames with_shared(HfTensorNames names, std::string_view folder) {
  // folder: "mlp.shared_expert" (Qwen2-MoE) or "mlp.shared_experts" (DeepSeek)
  names.shared_gate = folder == "mlp.shared_expert" ? "mlp.shared_expert.gate_proj.weight" : "mlp.shared_experts.gate_proj.weight";
  names.shared_up = folder == "mlp.shared_expert" ? "mlp.shared_expert.up_proj.weight" : "mlp.shared_experts.up_proj.weight";
  names.shared_down = folder == "mlp.shared_expert" ? "mlp.shared_expert.down_proj.weight" : "mlp.shared_experts.down_proj.weight";
  return names;
}

}  // namespace detail

/// The families moekit reads, one row each (docs/models.md).
inline std::span<const HfFamily> hf_families() {
  using namespace detail;
  static const HfFamily families[] = {
      {"mixtral",
       {.router = "block_sparse_moe.gate.weight",
        .gate = "block_sparse_moe.experts.{e}.w1.weight",
        .up = "block_sparse_moe.experts.{e}.w3.weight",
        .down = "block_sparse_moe.experts.{e}.w2.weight"},
       "model.layers.", hf_mixtral, hf_every_layer},
      {"qwen2_moe",
       [] {
         HfTensorNames n = with_shared(hf_mlp_names, "mlp.shared_expert");
         n.shared_output_gate = "mlp.shared_expert_gate.weight";
         return n;
       }(),
       "model.layers.", hf_qwen2_moe, hf_qwen_dense},
      {"qwen3_moe", hf_mlp_names, "model.layers.", [](const HfConfig& c) { return hf_qwen(c, "qwen3_moe", "moe_intermediate_size", false); },
       hf_qwen_dense},
      {"olmoe", hf_mlp_names, "model.layers.", [](const HfConfig& c) { return hf_qwen(c, "olmoe", "intermediate_size", false); },
       hf_every_layer},
      {"deepseek_v2", with_shared(hf_mlp_names, "mlp.shared_experts"), "model.layers.", hf_deepseek_v2,
       hf_deepseek_dense},
      {"deepseek_v3",
       [] {
         HfTensorNames n = with_shared(hf_mlp_names, "mlp.shared_experts");
         n.selection_bias = "mlp.gate.e_score_correction_bias";
         return n;
       }(),
       "model.layers.", hf_deepseek_v3, hf_deepseek_dense},
      {"llama4_text", hf_llama4_names, "model.layers.", hf_llama4, hf_llama4_dense},
      {"llama4", hf_llama4_names, "language_model.model.layers.", hf_llama4, hf_llama4_dense},
      {"gpt_oss",
       {.router = "mlp.router.weight",
        .logit_bias = "mlp.router.bias",
        .gate = "mlp.experts.gate_up_proj",
        .down = "mlp.experts.down_proj",
        .gate_bias = "mlp.experts.gate_up_proj_bias",
        .down_bias = "mlp.experts.down_proj_bias",
        .gate_up = HfGateUp::interleaved},
       "model.layers.", hf_gpt_oss, hf_every_layer},
  };
  return families;
}

/// A downloaded model folder. Opening it reads config.json and the shard index (not the shards).
class HfModel {
 public:
  static HfModel open(const std::filesystem::path& folder) {
    HfModel model = open_config(folder);
    model.read_index();
    return model;
  }

  /// The folder's config.json alone, for write_block() into a folder that has no weights yet.
  static HfModel open_config(const std::filesystem::path& folder) {
    HfModel model;
    model.folder_ = folder;
    model.config_ = HfConfig::read(folder / "config.json");
    const std::string type = model.config_.string("model_type");
    for (const auto& f : hf_families())
      if (f.model_type == type) model.family_ = &f;
    if (!model.family_) {
      std::string known;
      for (const auto& f : hf_families()) known += (known.empty() ? "" : ", ") + std::string(f.model_type);
      fail("moekit::HfModel: '", (folder / "config.json").string(), "' has model_type = '", type,
           "'; expected one of ", known, " (docs/models.md)");
    }
    model.layers_ = model.config_.integer("num_hidden_layers");
    return model;
  }


  const std::filesystem::path& folder() const { return folder_; }
  const HfConfig& config() const { return config_; }
  const HfFamily& family() const { return *family_; }
  Index layers() const { return layers_; }

  /// Why layer n is dense, or nothing when it is an MoE layer.
  std::optional<std::string> dense_because(Index n) const { return family_->dense_because(config_, n); }

  std::vector<Index> moe_layers() const {
    std::vector<Index> out;
    for (Index n = 0; n < layers_; ++n)
      if (!dense_because(n)) out.push_back(n);
    return out;
  }

  /// Layer n's MoE block: sizes, routing rule, shared expert, and what moekit does not do of it
  /// (HfBlock::unsupported()).
  HfBlock block(Index n) const {
    check_layer(n);
    HfBlock b = family_->block(config_);
    require(b.hidden >= 1 && b.ffn >= 1 && b.experts >= 1 && b.top_k >= 1 && b.top_k <= b.experts,
            "moekit::HfModel: '", config_.path().string(), "' gives hidden ", b.hidden, ", expert width ", b.ffn,
            ", ", b.experts, " experts and top-", b.top_k, "; expected sizes of at least 1 and top-k <= experts");
    return b;
  }

  /// The on-disk name of a tensor of layer n: "model.layers.N." + the family's name, with {e}.
  std::string tensor_name(Index n, std::string_view name, Index expert = -1) const {
    std::string out = std::string(family_->layer_prefix) + std::to_string(n) + "." + std::string(name);
    if (const auto at = out.find("{e}"); at != std::string::npos) out.replace(at, 3, std::to_string(expert));
    return out;
  }

  /// Layer n's block as one safetensors file in memory, under moekit's names (router.weight,
  /// experts.*, shared.*, router.bias) in T: the whole [E,…] tensors from the per-expert ones.
  /// Reads each shard's header and the bytes of this block's tensors only.
  template <Scalar T>
  SafeTensors read_block(Index n) const {
    const HfBlock b = block(n);
    if (const auto missing = b.unsupported(); !missing.empty())
      fail("moekit::HfModel: layer ", n, " of '", folder_.string(), "' (", b.family, ") needs ", join(missing),
           "; moekit does not do this (docs/models.md)");
    const auto wanted = tensors_of(n, b);
    std::map<std::filesystem::path, std::set<std::string, std::less<>>> by_file;
    for (const auto& t : wanted)
      for (const auto& name : t.on_disk) by_file[file_of(name)].insert(name);
    std::map<std::filesystem::path, SafeTensors> files;
    for (const auto& [file, names] : by_file)
      files[file] = SafeTensors::read(file, [&](std::string_view name) { return names.contains(name); });

    SafeTensors block_file;
    for (const auto& t : wanted) {
      std::vector<T> values;
      for (const auto& name : t.on_disk) {
        const auto& file = files.at(file_of(name));
        require(file.contains(name), "moekit::HfModel: '", file_of(name).string(), "' has no tensor '", name,
                "'", stored_as_blocks(file, name), "; expected ", t.what, " there",
                index_.empty() ? "" : " (model.safetensors.index.json places it in this file)");
        const auto& info = file.info(name);
        require(info.shape == t.shape, "moekit::HfModel: '", file_of(name).string(), "' tensor '", name, "' is ",
                shape_string(info.shape), "; expected ", shape_string(t.shape), " (", t.what, ", from config.json's ",
                t.sizes, ")");
        const auto part = file.values<T>(name);
        values.insert(values.end(), part.begin(), part.end());
      }
      if (t.layout != Layout::as_stored) values = from_stored(t, values);
      block_file.add(t.moekit, t.whole, std::span<const T>(values));
    }
    return block_file;
  }

  /// How layer n's block is stored: one entry per moekit tensor, with the first of its on-disk
  /// tensors, how many there are (one per expert, or one), and their dtype and shape as the
  /// headers give them (only headers are read). A tensor not found has an empty `file`.
  struct Stored {
    std::string moekit, on_disk;
    std::size_t count = 0;
    std::filesystem::path file;
    DType dtype = DType::f32;
    std::vector<Index> shape;
  };
  std::vector<Stored> stored(Index n) const {
    std::vector<Stored> out;
    std::map<std::filesystem::path, SafeTensors> headers;
    for (const auto& t : tensors_of(n, block(n))) {
      Stored entry{t.moekit, t.on_disk.front(), t.on_disk.size(), {}, DType::f32, {}};
      if (const auto file = find_file(entry.on_disk)) {
        if (!headers.contains(*file)) headers[*file] = SafeTensors::read(*file, [](std::string_view) { return false; });
        if (const auto& header = headers[*file]; header.contains(entry.on_disk)) {
          entry.file = *file;
          entry.dtype = header.info(entry.on_disk).dtype;
          entry.shape = header.info(entry.on_disk).shape;
        }
      }
      out.push_back(std::move(entry));
    }
    return out;
  }

  /// Loads layer n's block into `layer`, which must be of the type the block maps to.
  template <class Layer>
  void load(Layer& layer, Index n) const {
    layer.load(read_block<typename Layer::scalar_type>(n), folder_ / ("layer " + std::to_string(n)));
  }

  /// The reverse: `layer`'s parameters (and its AuxFree bias) under layer n's names of this
  /// family, as dtype (F32, F64, BF16 or F16), in one safetensors file.
  template <class Layer>
  void write_block(const Layer& layer, Index n, const std::filesystem::path& path, DType dtype = DType::f32) const {
    const HfBlock b = block(n);
    std::map<std::string, std::pair<std::vector<Index>, std::vector<double>>> fused;  // tensors two moekit tensors share
    SafeTensors out;
    out.metadata()["format"] = "pt";
    for (const auto& t : tensors_of(n, b)) {
      std::vector<double> values;
      if (t.moekit == "router.bias") {
        if constexpr (requires { layer.balance_state().bias; })
          values.assign(layer.balance_state().bias.begin(), layer.balance_state().bias.end());
        values.resize(static_cast<std::size_t>(b.experts), 0.0);
      } else {
        const auto& p = layer.parameter(t.moekit);
        values.assign(p.values().begin(), p.values().end());
      }
      if (t.layout != Layout::as_stored) {
        auto& [shape, stored] = fused[t.on_disk.front()];
        shape = t.shape;
        stored.resize(values.size() * (t.layout == Layout::transposed ? 1 : 2));
        for_each_element(t, [&](std::size_t moekit, std::size_t disk) { stored[disk] = values[moekit]; });
        continue;
      }
      const std::size_t each = values.size() / t.on_disk.size();
      for (std::size_t i = 0; i < t.on_disk.size(); ++i)
        out.add_as(t.on_disk[i], t.shape, std::span<const double>(values).subspan(i * each, each), dtype);
    }
    for (const auto& [name, tensor] : fused) out.add_as(name, tensor.first, std::span<const double>(tensor.second), dtype);
    out.write(path);
  }

 private:
  /// How a moekit tensor [E,A,B] lies on disk: as it is (one tensor, or one per expert in order),
  /// transposed ([E,B,A]: Llama 4's and GPT-OSS's down_proj), or as the first or second half
  /// of the columns of a transposed pair ([E,B,2A]: Llama 4's gate_up_proj), or as its even or
  /// odd columns (GPT-OSS's gate_up_proj). A bias [E,A] is read as [E,A,1] (GPT-OSS's
  /// gate_up_proj_bias [E,2A]: its even and odd columns).
  enum class Layout {
    as_stored,
    transposed,
    first_half_transposed,
    second_half_transposed,
    even_columns_transposed,
    odd_columns_transposed
  };

  /// One moekit tensor of a block: its whole shape, and the on-disk tensors it is made of, each
  /// of `shape`.
  struct BlockTensor {
    std::string moekit;
    std::vector<Index> whole, shape;
    std::vector<std::string> on_disk;
    std::string what, sizes;
    Layout layout = Layout::as_stored;
  };

  /// f(moekit index, on-disk index) for each element of a tensor of a transposed layout: moekit's
  /// [e][i][j] is the disk's [e][j][first + step·i] of `columns` columns.
  template <class F>
  static void for_each_element(const BlockTensor& t, F f) {
    const Index experts = t.whole[0], a = t.whole[1], b = t.whole.size() > 2 ? t.whole[2] : 1;
    const Index columns = t.layout == Layout::transposed ? a : 2 * a;
    const bool interleaved = t.layout == Layout::even_columns_transposed || t.layout == Layout::odd_columns_transposed;
    const Index step = interleaved ? 2 : 1;
    const Index first = t.layout == Layout::second_half_transposed ? a : t.layout == Layout::odd_columns_transposed ? 1 : 0;
    for (Index e = 0; e < experts; ++e)
      for (Index i = 0; i < a; ++i)
        for (Index j = 0; j < b; ++j)
          f(static_cast<std::size_t>((e * a + i) * b + j),
            static_cast<std::size_t>((e * b + j) * columns + first + step * i));
  }

  template <class T>
  static std::vector<T> from_stored(const BlockTensor& t, const std::vector<T>& stored) {
    std::vector<T> out(static_cast<std::size_t>(element_count(t.whole)));
    for_each_element(t, [&](std::size_t moekit, std::size_t disk) { out[moekit] = stored[disk]; });
    return out;
  }

  std::vector<BlockTensor> tensors_of(Index n, const HfBlock& b) const {
    const auto& names = family_->names;
    const Index h = b.hidden, f = b.ffn, e = b.experts, s = b.shared_ffn;
    std::vector<BlockTensor> out;
    auto one = [&](std::string_view moekit, std::string_view name, std::vector<Index> whole, std::vector<Index> shape,
                   std::string what, std::string sizes) {
      out.push_back({std::string(moekit), std::move(whole), std::move(shape), {tensor_name(n, name)}, std::move(what),
                     std::move(sizes)});
    };
    auto per_expert = [&](std::string_view moekit, std::string_view name, std::vector<Index> shape, std::string what,
                          std::string sizes) {
      BlockTensor t{std::string(moekit), {e}, shape, {}, std::move(what), std::move(sizes)};
      t.whole.insert(t.whole.end(), shape.begin(), shape.end());
      for (Index i = 0; i < e; ++i) t.on_disk.push_back(tensor_name(n, name, i));
      out.push_back(std::move(t));
    };
    const std::string ffn_h = "the expert width and hidden_size", h_ffn = "hidden_size and the expert width";
    one("router.weight", names.router, {e, h}, {e, h}, "the router's weight", "the expert count and hidden_size");
    if (b.logit_bias) one("router.logit_bias", names.logit_bias, {e}, {e}, "the router's bias", "the expert count");
    if (b.has_shared() && !names.shared_gate.empty()) {
      const std::string shared_sizes = "the shared expert's width and hidden_size";
      one("shared.gate", names.shared_gate, {1, s, h}, {s, h}, "the shared expert's gate_proj", shared_sizes);
      one("shared.up", names.shared_up, {1, s, h}, {s, h}, "the shared expert's up_proj", shared_sizes);
      one("shared.down", names.shared_down, {1, h, s}, {h, s}, "the shared expert's down_proj",
          "hidden_size and the shared expert's width");
      if (!names.shared_output_gate.empty())
        one("shared.output_gate", names.shared_output_gate, {1, h}, {1, h}, "the shared expert's gate",
            "hidden_size");
    }
    if (names.gate_up != HfGateUp::separate) {
      auto fused = [&](std::string_view moekit, std::string_view name, std::vector<Index> whole, std::vector<Index> shape,
                       Layout layout, std::string what) {
        one(moekit, name, std::move(whole), std::move(shape), std::move(what), "the expert count, hidden_size and the expert width");
        out.back().layout = layout;
      };
      const bool halves = names.gate_up == HfGateUp::halves;
      const Layout gate = halves ? Layout::first_half_transposed : Layout::even_columns_transposed;
      const Layout up = halves ? Layout::second_half_transposed : Layout::odd_columns_transposed;
      fused("experts.gate", names.gate, {e, f, h}, {e, h, 2 * f}, gate, "the experts' gate_up_proj");
      fused("experts.up", names.gate, {e, f, h}, {e, h, 2 * f}, up, "the experts' gate_up_proj");
      fused("experts.down", names.down, {e, h, f}, {e, f, h}, Layout::transposed, "the experts' down_proj");
      if (b.clamped_biased()) {
        fused("experts.gate_bias", names.gate_bias, {e, f}, {e, 2 * f}, gate, "the experts' gate_up_proj_bias");
        fused("experts.up_bias", names.gate_bias, {e, f}, {e, 2 * f}, up, "the experts' gate_up_proj_bias");
        one("experts.down_bias", names.down_bias, {e, h}, {e, h}, "the experts' down_proj_bias",
            "the expert count and hidden_size");
      }
    } else {
      per_expert("experts.gate", names.gate, {f, h}, "an expert's gate_proj", ffn_h);
      per_expert("experts.up", names.up, {f, h}, "an expert's up_proj", ffn_h);
      per_expert("experts.down", names.down, {h, f}, "an expert's down_proj", h_ffn);
    }
    if (b.selection_bias && !names.selection_bias.empty())
      one("router.bias", names.selection_bias, {e}, {e}, "the router's selection bias", "the expert count");
    return out;
  }

  void check_layer(Index n) const {
    require(n >= 0 && n < layers_, "moekit::HfModel: layer ", n, " of '", folder_.string(), "'; expected 0 to ",
            layers_ - 1, " (num_hidden_layers = ", layers_, ")");
    if (const auto why = dense_because(n)) {
      std::string moe;
      for (const Index m : moe_layers()) moe += (moe.empty() ? "" : ", ") + std::to_string(m);
      fail("moekit::HfModel: layer ", n, " of '", folder_.string(), "' is dense (", *why,
           "); expected an MoE layer: ", moe.empty() ? "this model has none" : moe);
    }
  }

  /// model.safetensors.index.json's weight_map, if the folder has one.
  void read_index() {
    const auto index = folder_ / "model.safetensors.index.json";
    if (!std::filesystem::exists(index)) {
      require(std::filesystem::exists(folder_ / "model.safetensors"), "moekit::HfModel: '", folder_.string(),
              "' has neither model.safetensors nor model.safetensors.index.json; expected the weights in one of them");
      return;
    }
    std::ifstream in(index, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto root = detail::JsonParser(text, index.string(), "moekit::HfModel", "JSON document").parse();
    const detail::Json* map = nullptr;
    for (const auto& [k, v] : root.members)
      if (k == "weight_map") map = &v;
    require(map && map->kind == detail::Json::Kind::object, "moekit::HfModel: '", index.string(),
            "' has no weight_map object; expected {\"weight_map\": {tensor: file, …}}");
    for (const auto& [name, file] : map->members) {
      require(file.kind == detail::Json::Kind::string && !file.text.empty() &&
                  file.text.find('/') == std::string::npos && file.text != "..",
              "moekit::HfModel: '", index.string(), "' places tensor '", name, "' in '", file.text,
              "'; expected a file name in the folder");
      index_[name] = file.text;
    }
  }

  /// The file that holds tensor `name`: the index's, or model.safetensors.
  std::optional<std::filesystem::path> find_file(const std::string& name) const {
    if (index_.empty()) return folder_ / "model.safetensors";
    const auto it = index_.find(name);
    if (it == index_.end()) return std::nullopt;
    return folder_ / it->second;
  }

  std::filesystem::path file_of(const std::string& name) const {
    const auto file = find_file(name);
    if (!file) {
      std::string blocks;
      for (const std::string suffix : {"_blocks", "_scales"})
        if (index_.contains(name + suffix)) blocks = " but places '" + name + suffix + "'" + std::string(quantised);
      fail("moekit::HfModel: '", (folder_ / "model.safetensors.index.json").string(), "' has no tensor '", name,
           "'", blocks, "; expected every tensor of the MoE layer in its weight_map");
    }
    return *file;
  }

  /// ", stored as MXFP4 blocks ('…_blocks')": why a tensor is missing when its quantised form is there.
  static std::string stored_as_blocks(const SafeTensors& file, const std::string& name) {
    for (const std::string suffix : {"_blocks", "_scales"})
      if (file.contains(name + suffix)) return " but '" + name + suffix + "'" + std::string(quantised);
    return "";
  }
  static constexpr std::string_view quantised =
      " (quantised blocks, such as MXFP4, which moekit does not read: dequantize the model to BF16 first)";

  static std::string join(const std::vector<std::string>& parts) {
    std::string out;
    for (const auto& p : parts) out += (out.empty() ? "" : "; ") + p;
    return out;
  }

  std::filesystem::path folder_;
  HfConfig config_;
  const HfFamily* family_ = nullptr;
  Index layers_ = 0;
  std::map<std::string, std::string, std::less<>> index_;  // tensor → shard file
};

}  // namespace moekit::io
