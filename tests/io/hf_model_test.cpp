// Hugging Face model folders: for each family a small folder of this test's own (config.json with
// the family's keys, random weights under the family's names in BF16, F16 or F32, split over two
// shards with an index, attention weights beside them), read by HfModel and run through
// moekit-hf forward, against a plain float64 reference written from the rules in docs/models.md;
// the fixtures written back as folders; and every error of the reader provoked.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include <moekit/io/hf_model.hpp>
#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/tolerance.hpp"

namespace moekit::test {
namespace {

namespace fs = std::filesystem;
using io::DType;

// ---- a family's block, as the reference computes it ----------------------------------------

struct Rule {
  ScoreFn score = ScoreFn::softmax;
  bool normalize = false;
  double scale = 1;
  int groups = 1, groups_kept = 1;
  bool group_by_max = false;  // DeepSeek-V2: a group's best score; else DeepSeek-V3's top-2 sum
  bool gated_shared = false;  // Qwen2-MoE: the shared expert × σ(x·w)
  bool weight_input = false;  // Llama 4: y = Σ expert(w·x)
  bool gpt_oss = false;       // GPT-OSS: biases on the logits and the projections, the clamped SwiGLU
};

struct Weights {
  Index hidden = 0, ffn = 0, experts = 0, shared_ffn = 0;
  int top_k = 0;
  std::vector<double> router = {}, bias = {};  // [E,H], [E] (DeepSeek-V3's selection bias)
  std::vector<double> logit_bias = {};          // [E] (GPT-OSS)
  std::vector<std::vector<double>> gate = {}, up = {}, down = {};  // per expert: [F,H], [F,H], [H,F]
  std::vector<std::vector<double>> gate_bias = {}, up_bias = {}, down_bias = {};  // per expert: [F], [F], [H] (GPT-OSS)
  std::vector<double> shared_gate = {}, shared_up = {}, shared_down = {}, shared_output_gate = {};  // [Fs,H] [Fs,H] [H,Fs] [H]
};

double silu(double v) { return v / (1 + std::exp(-v)); }

/// down · (silu(gate·x) ⊙ up·x) for one token.
std::vector<double> swiglu(const std::vector<double>& gate, const std::vector<double>& up,
                           const std::vector<double>& down, Index hidden, Index width, const double* x) {
  std::vector<double> out(static_cast<std::size_t>(hidden), 0.0);
  for (Index f = 0; f < width; ++f) {
    double g = 0, u = 0;
    for (Index h = 0; h < hidden; ++h) {
      g += gate[static_cast<std::size_t>(f * hidden + h)] * x[h];
      u += up[static_cast<std::size_t>(f * hidden + h)] * x[h];
    }
    const double a = silu(g) * u;
    for (Index h = 0; h < hidden; ++h) out[static_cast<std::size_t>(h)] += down[static_cast<std::size_t>(h * width + f)] * a;
  }
  return out;
}

/// GPT-OSS's expert e for one token: g = min(gate·x + b_g, 7), u = clamp(up·x + b_u, ±7),
/// down · ((u + 1) · g · σ(1.702 g)) + b_d.
std::vector<double> gpt_oss_expert(const Weights& w, std::size_t e, const double* x) {
  const Index hidden = w.hidden, width = w.ffn;
  std::vector<double> out = w.down_bias[e];
  for (Index f = 0; f < width; ++f) {
    double g = w.gate_bias[e][static_cast<std::size_t>(f)], u = w.up_bias[e][static_cast<std::size_t>(f)];
    for (Index h = 0; h < hidden; ++h) {
      g += w.gate[e][static_cast<std::size_t>(f * hidden + h)] * x[h];
      u += w.up[e][static_cast<std::size_t>(f * hidden + h)] * x[h];
    }
    g = std::min(g, 7.0);
    u = std::clamp(u, -7.0, 7.0);
    const double a = (u + 1) * g / (1 + std::exp(-1.702 * g));
    for (Index h = 0; h < hidden; ++h) out[static_cast<std::size_t>(h)] += w.down[e][static_cast<std::size_t>(h * width + f)] * a;
  }
  return out;
}

/// The k largest of `values` (indices), largest first; ties to the lower index.
std::vector<Index> top(const std::vector<double>& values, int k) {
  std::vector<Index> order(values.size());
  std::iota(order.begin(), order.end(), Index{0});
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    return values[static_cast<std::size_t>(a)] > values[static_cast<std::size_t>(b)];
  });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

/// The block's output for x [T,H], from the rules of docs/models.md.
Matrix<double> reference(const Weights& w, const Rule& rule, const Matrix<double>& x) {
  const Index hidden = w.hidden, experts = w.experts;
  Matrix<double> y = Matrix<double>::Zero(x.rows(), hidden);
  for (Index t = 0; t < x.rows(); ++t) {
    const double* xt = x.row(t).data();
    std::vector<double> score(static_cast<std::size_t>(experts));
    for (Index e = 0; e < experts; ++e) {
      double logit = 0;
      for (Index h = 0; h < hidden; ++h) logit += w.router[static_cast<std::size_t>(e * hidden + h)] * xt[h];
      score[static_cast<std::size_t>(e)] = logit + (w.logit_bias.empty() ? 0.0 : w.logit_bias[static_cast<std::size_t>(e)]);
    }
    if (rule.gpt_oss) {  // a softmax over the top-K logits
      const auto chosen = top(score, w.top_k);
      double sum = 0;
      for (const Index e : chosen) sum += std::exp(score[static_cast<std::size_t>(e)] - score[static_cast<std::size_t>(chosen[0])]);
      for (const Index e : chosen) {
        const double weight = std::exp(score[static_cast<std::size_t>(e)] - score[static_cast<std::size_t>(chosen[0])]) / sum;
        const auto out = gpt_oss_expert(w, static_cast<std::size_t>(e), xt);
        for (Index h = 0; h < hidden; ++h) y(t, h) += weight * out[static_cast<std::size_t>(h)];
      }
      continue;
    }
    if (rule.score == ScoreFn::softmax) {
      const double m = *std::max_element(score.begin(), score.end());
      double sum = 0;
      for (double& s : score) sum += (s = std::exp(s - m));
      for (double& s : score) s /= sum;
    } else {
      for (double& s : score) s = 1 / (1 + std::exp(-s));
    }
    std::vector<double> select = score;  // what the top-k is taken over
    if (!w.bias.empty())
      for (Index e = 0; e < experts; ++e) select[static_cast<std::size_t>(e)] += w.bias[static_cast<std::size_t>(e)];
    if (rule.groups > 1) {  // keep the best groups; the others' experts count as 0
      const Index size = experts / rule.groups;
      std::vector<double> group_score(static_cast<std::size_t>(rule.groups));
      for (int g = 0; g < rule.groups; ++g) {
        std::vector<double> members(select.begin() + g * size, select.begin() + (g + 1) * size);
        std::sort(members.rbegin(), members.rend());
        group_score[static_cast<std::size_t>(g)] = rule.group_by_max ? members[0] : members[0] + members[1];
      }
      const auto kept = top(group_score, rule.groups_kept);
      for (Index e = 0; e < experts; ++e)
        if (std::find(kept.begin(), kept.end(), e / size) == kept.end()) select[static_cast<std::size_t>(e)] = 0;
    }
    const auto chosen = top(select, w.top_k);
    std::vector<double> weight;
    double sum = 0;
    for (const Index e : chosen) sum += score[static_cast<std::size_t>(e)];
    for (const Index e : chosen)
      weight.push_back(score[static_cast<std::size_t>(e)] / (rule.normalize ? sum + (rule.score == ScoreFn::sigmoid ? 1e-20 : 0) : 1) *
                       rule.scale);
    for (std::size_t k = 0; k < chosen.size(); ++k) {
      const auto e = static_cast<std::size_t>(chosen[k]);
      if (rule.weight_input) {
        std::vector<double> scaled(xt, xt + hidden);
        for (double& v : scaled) v *= weight[k];
        const auto out = swiglu(w.gate[e], w.up[e], w.down[e], hidden, w.ffn, scaled.data());
        for (Index h = 0; h < hidden; ++h) y(t, h) += out[static_cast<std::size_t>(h)];
      } else {
        const auto out = swiglu(w.gate[e], w.up[e], w.down[e], hidden, w.ffn, xt);
        for (Index h = 0; h < hidden; ++h) y(t, h) += weight[k] * out[static_cast<std::size_t>(h)];
      }
    }
    if (w.shared_ffn > 0) {
      double g = 1;
      if (rule.gated_shared) {
        double a = 0;
        for (Index h = 0; h < hidden; ++h) a += w.shared_output_gate[static_cast<std::size_t>(h)] * xt[h];
        g = 1 / (1 + std::exp(-a));
      }
      const auto out = swiglu(w.shared_gate, w.shared_up, w.shared_down, hidden, w.shared_ffn, xt);
      for (Index h = 0; h < hidden; ++h) y(t, h) += g * out[static_cast<std::size_t>(h)];
    }
  }
  return y;
}

// ---- a folder of the family's own names and keys -----------------------------------------

/// Values k/4096 with |k| < 256: exact in BF16 and F16, so every dtype stores the same weights.
std::vector<double> draws(std::mt19937& rng, Index n, int range = 255) {
  std::uniform_int_distribution<int> k(-range, range);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (double& x : v) x = k(rng) / 4096.0;
  return v;
}

/// The names a family stores one MoE layer under (written here from the checkpoints, not from
/// moekit's table).
struct Names {
  std::string router, bias, gate, up, down, shared_gate, shared_up, shared_down, shared_output_gate;
  std::string logit_bias = {}, gate_up_bias = {}, down_bias = {};  // GPT-OSS
};

struct Family {
  std::string model_type = {};
  std::string config = {};  // config.json's keys beyond model_type, hidden_size, num_hidden_layers
  Names names = {};
  Rule rule = {};
  Index hidden = 16, ffn = 12, experts = 8, shared_ffn = 0;
  int top_k = 2;
  bool bias = false;
  std::vector<Index> moe_layers = {};  // of 3
  DType dtype = DType::bf16;
  std::string prefix = "model.layers.";
  bool fused = false;   // Llama 4, GPT-OSS: gate_up_proj [E,H,2F] and down_proj [E,F,H] for all experts
  bool interleaved = false;  // GPT-OSS: gate in the even columns of gate_up_proj, up in the odd
  bool nested = false;  // Llama 4's multimodal config: the sizes in text_config
};

std::string expert_name(std::string pattern, Index layer, Index e, const std::string& prefix = "model.layers.") {
  pattern = prefix + std::to_string(layer) + "." + pattern;
  if (const auto at = pattern.find("{e}"); at != std::string::npos) pattern.replace(at, 3, std::to_string(e));
  return pattern;
}

const Names mlp{"mlp.gate.weight", "", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                "mlp.experts.{e}.down_proj.weight", "", "", "", ""};

std::vector<Family> families() {
  std::vector<Family> f;
  f.push_back({"mixtral", R"("num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 12)",
               {"block_sparse_moe.gate.weight", "", "block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight", "", "", "", ""},
               {.normalize = true}});
  f.back().moe_layers = {0, 1, 2};
  Names qwen2 = mlp;
  qwen2.shared_gate = "mlp.shared_expert.gate_proj.weight";
  qwen2.shared_up = "mlp.shared_expert.up_proj.weight";
  qwen2.shared_down = "mlp.shared_expert.down_proj.weight";
  qwen2.shared_output_gate = "mlp.shared_expert_gate.weight";
  f.push_back({"qwen2_moe",
               R"("num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 12, "intermediate_size": 40,
                  "shared_expert_intermediate_size": 20, "norm_topk_prob": false, "decoder_sparse_step": 1,
                  "mlp_only_layers": [0])",
               qwen2, {.gated_shared = true}});
  f.back().shared_ffn = 20;
  f.back().moe_layers = {1, 2};
  f.back().dtype = DType::f16;
  f.push_back({"qwen3_moe",
               R"("num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 12, "norm_topk_prob": true,
                  "decoder_sparse_step": 2, "mlp_only_layers": [])",
               mlp, {.normalize = true}});
  f.back().experts = 16;
  f.back().top_k = 4;
  f.back().moe_layers = {1};
  f.push_back({"olmoe", R"("num_local_experts": 16, "num_experts_per_tok": 8, "intermediate_size": 12, "norm_topk_prob": false)",
               mlp, {}});
  f.back().experts = 16;
  f.back().top_k = 8;
  f.back().moe_layers = {0, 1, 2};
  f.back().dtype = DType::f32;
  Names deepseek = mlp;
  deepseek.shared_gate = "mlp.shared_experts.gate_proj.weight";
  deepseek.shared_up = "mlp.shared_experts.up_proj.weight";
  deepseek.shared_down = "mlp.shared_experts.down_proj.weight";
  f.push_back({"deepseek_v2",
               R"("n_routed_experts": 12, "num_experts_per_tok": 6, "moe_intermediate_size": 12, "n_shared_experts": 2,
                  "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "group_limited_greedy",
                  "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0, "norm_topk_prob": false)",
               deepseek, {.scale = 16, .groups = 4, .groups_kept = 2, .group_by_max = true}});
  f.back().experts = 12;
  f.back().top_k = 6;
  f.back().shared_ffn = 24;
  f.back().moe_layers = {1, 2};
  Names v3 = deepseek;
  v3.bias = "mlp.gate.e_score_correction_bias";
  f.push_back({"deepseek_v3",
               R"("n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 12, "n_shared_experts": 1,
                  "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                  "norm_topk_prob": true, "topk_method": "noaux_tc", "scoring_func": "sigmoid")",
               v3, {.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5, .groups = 4, .groups_kept = 2}});
  f.back().experts = 16;
  f.back().top_k = 4;
  f.back().shared_ffn = 12;
  f.back().bias = true;
  f.back().moe_layers = {1, 2};
  const Names llama4{"feed_forward.router.weight", "", "feed_forward.experts.gate_up_proj", "",
                     "feed_forward.experts.down_proj", "feed_forward.shared_expert.gate_proj.weight",
                     "feed_forward.shared_expert.up_proj.weight", "feed_forward.shared_expert.down_proj.weight", ""};
  f.push_back({"llama4_text",
               R"("num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size": 12, "intermediate_size_mlp": 40,
                  "interleave_moe_layer_step": 2)",
               llama4, {.score = ScoreFn::sigmoid, .weight_input = true}});
  f.back().top_k = 1;
  f.back().shared_ffn = 12;
  f.back().moe_layers = {1};
  f.back().fused = true;
  f.push_back(f.back());
  f.back().model_type = "llama4";
  f.back().config = R"("num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size": 12, "moe_layers": [0, 2])";
  f.back().moe_layers = {0, 2};
  f.back().prefix = "language_model.model.layers.";
  f.back().nested = true;
  f.back().dtype = DType::f32;
  Names gpt_oss{"mlp.router.weight", "", "mlp.experts.gate_up_proj", "", "mlp.experts.down_proj", "", "", "", ""};
  gpt_oss.logit_bias = "mlp.router.bias";
  gpt_oss.gate_up_bias = "mlp.experts.gate_up_proj_bias";
  gpt_oss.down_bias = "mlp.experts.down_proj_bias";
  f.push_back({"gpt_oss",
               R"("num_local_experts": 8, "num_experts_per_tok": 4, "intermediate_size": 12, "swiglu_limit": 7.0,
                  "experts_per_token": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"])",
               gpt_oss, {.gpt_oss = true}});
  f.back().top_k = 4;
  f.back().moe_layers = {0, 1, 2};
  f.back().fused = true;
  f.back().interleaved = true;
  return f;
}

/// A folder being written: its tensors, then config.json and two shards with an index.
class Folder {
 public:
  explicit Folder(const std::string& name)
      : dir_(fs::temp_directory_path() / ("moekit_hf_" + std::to_string(::getpid()) + "_" + name)) {
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~Folder() { fs::remove_all(dir_); }
  const fs::path& dir() const { return dir_; }

  void add(const std::string& name, std::vector<Index> shape, std::vector<double> values, DType dtype) {
    tensors_.push_back({name, std::move(shape), std::move(values), dtype});
  }

  /// config.json, and the tensors alternately in two shards (or one model.safetensors).
  void write(const std::string& config, bool sharded = true) const {
    std::ofstream(dir_ / "config.json") << "{" << config << "}";
    io::SafeTensors shards[2];
    std::string map;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      const std::size_t s = sharded ? i % 2 : 0;
      shards[s].add_as(t.name, t.shape, std::span<const double>(t.values), t.dtype);
      map += (map.empty() ? "" : ",") + ("\"" + t.name + "\": \"" + shard_name(s, sharded) + "\"");
    }
    shards[0].write(dir_ / shard_name(0, sharded));
    if (!sharded) return;
    shards[1].write(dir_ / shard_name(1, sharded));
    std::ofstream(dir_ / "model.safetensors.index.json") << R"({"metadata": {"total_size": 0}, "weight_map": {)" << map << "}}";
  }

 private:
  static std::string shard_name(std::size_t s, bool sharded) {
    return sharded ? "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors" : "model.safetensors";
  }
  struct Stored {
    std::string name;
    std::vector<Index> shape;
    std::vector<double> values;
    DType dtype;
  };
  fs::path dir_;
  std::vector<Stored> tensors_;
};

/// A folder of the family with three layers (their MoE blocks where the family has them, dense
/// MLPs and attention weights elsewhere), and layer `layer`'s weights for the reference.
Weights write_family(const Family& f, Folder& folder, Index layer, unsigned seed, bool sharded = true) {
  std::mt19937 rng(seed);
  const Index h = f.hidden, e = f.experts, ffn = f.ffn, s = f.shared_ffn;
  Weights kept;
  auto name = [&](const std::string& pattern, Index n, Index i = 0) { return expert_name(pattern, n, i, f.prefix); };
  folder.add("model.embed_tokens.weight", {32, h}, draws(rng, 32 * h), DType::bf16);
  for (Index n = 0; n < 3; ++n) {
    folder.add(name("self_attn.q_proj.weight", n), {h, h}, draws(rng, h * h), DType::bf16);
    folder.add(name("input_layernorm.weight", n), {h}, draws(rng, h), DType::f32);
    if (std::find(f.moe_layers.begin(), f.moe_layers.end(), n) == f.moe_layers.end()) {
      folder.add(name("mlp.gate_proj.weight", n), {40, h}, draws(rng, 40 * h), f.dtype);
      continue;
    }
    Weights w{h, ffn, e, s, f.top_k};
    w.router = draws(rng, e * h);
    folder.add(name(f.names.router, n), {e, h}, w.router, f.dtype);
    if (f.bias) {
      w.bias = draws(rng, e, 2047);  // larger: the bias must move the selection
      folder.add(name(f.names.bias, n), {e}, w.bias, DType::f32);
    }
    if (!f.names.logit_bias.empty()) {
      w.logit_bias = draws(rng, e);  // k/512 up to ±0.5, exact in BF16: the bias must move the selection
      for (double& v : w.logit_bias) v *= 8;
      folder.add(name(f.names.logit_bias, n), {e}, w.logit_bias, f.dtype);
    }
    for (Index i = 0; i < e; ++i) {
      w.gate.push_back(draws(rng, ffn * h));
      w.up.push_back(draws(rng, ffn * h));
      w.down.push_back(draws(rng, h * ffn));
      if (f.fused) continue;
      folder.add(name(f.names.gate, n, i), {ffn, h}, w.gate.back(), f.dtype);
      folder.add(name(f.names.up, n, i), {ffn, h}, w.up.back(), f.dtype);
      folder.add(name(f.names.down, n, i), {h, ffn}, w.down.back(), f.dtype);
    }
    if (f.fused) {  // x · W: gate_up_proj[e][h][·] holds gate[e][j][h] and up[e][j][h] at
                    // columns j and F + j (Llama 4), or 2j and 2j + 1 (GPT-OSS)
      const auto gate_column = [&](Index j) { return f.interleaved ? 2 * j : j; };
      const auto up_column = [&](Index j) { return f.interleaved ? 2 * j + 1 : ffn + j; };
      std::vector<double> gate_up(static_cast<std::size_t>(e * h * 2 * ffn)), down(static_cast<std::size_t>(e * ffn * h));
      for (Index i = 0; i < e; ++i)
        for (Index r = 0; r < h; ++r)
          for (Index j = 0; j < ffn; ++j) {
            const auto at = static_cast<std::size_t>(j * h + r);
            gate_up[static_cast<std::size_t>((i * h + r) * 2 * ffn + gate_column(j))] = w.gate[static_cast<std::size_t>(i)][at];
            gate_up[static_cast<std::size_t>((i * h + r) * 2 * ffn + up_column(j))] = w.up[static_cast<std::size_t>(i)][at];
            down[static_cast<std::size_t>((i * ffn + j) * h + r)] = w.down[static_cast<std::size_t>(i)][static_cast<std::size_t>(r * ffn + j)];
          }
      folder.add(name(f.names.gate, n), {e, h, 2 * ffn}, gate_up, f.dtype);
      folder.add(name(f.names.down, n), {e, ffn, h}, down, f.dtype);
    }
    if (!f.names.gate_up_bias.empty()) {
      // Values k/16 up to ±10, exact in BF16: past the clamps at 7 for many columns. The down
      // bias k/256, up to ±1.
      std::vector<double> gate_up_bias(static_cast<std::size_t>(e * 2 * ffn)), down_bias;
      for (Index i = 0; i < e; ++i) {
        w.gate_bias.push_back(draws(rng, ffn, 160));
        w.up_bias.push_back(draws(rng, ffn, 160));
        w.down_bias.push_back(draws(rng, h));
        for (auto* b : {&w.gate_bias.back(), &w.up_bias.back()})
          for (double& v : *b) v *= 256;
        for (double& v : w.down_bias.back()) v *= 16;
        for (Index j = 0; j < ffn; ++j) {
          gate_up_bias[static_cast<std::size_t>(i * 2 * ffn + 2 * j)] = w.gate_bias.back()[static_cast<std::size_t>(j)];
          gate_up_bias[static_cast<std::size_t>(i * 2 * ffn + 2 * j + 1)] = w.up_bias.back()[static_cast<std::size_t>(j)];
        }
        down_bias.insert(down_bias.end(), w.down_bias.back().begin(), w.down_bias.back().end());
      }
      folder.add(name(f.names.gate_up_bias, n), {e, 2 * ffn}, gate_up_bias, f.dtype);
      folder.add(name(f.names.down_bias, n), {e, h}, down_bias, f.dtype);
    }
    if (s > 0) {
      w.shared_gate = draws(rng, s * h);
      w.shared_up = draws(rng, s * h);
      w.shared_down = draws(rng, h * s);
      folder.add(name(f.names.shared_gate, n), {s, h}, w.shared_gate, f.dtype);
      folder.add(name(f.names.shared_up, n), {s, h}, w.shared_up, f.dtype);
      folder.add(name(f.names.shared_down, n), {h, s}, w.shared_down, f.dtype);
      if (!f.names.shared_output_gate.empty()) {
        w.shared_output_gate = draws(rng, h, 2047);
        folder.add(name(f.names.shared_output_gate, n), {1, h}, w.shared_output_gate, f.dtype);
      }
    }
    if (n == layer) kept = w;
  }
  const std::string sizes = R"("hidden_size": 16, "num_hidden_layers": 3, )" + f.config;
  folder.write(R"("model_type": ")" + f.model_type + "\", " + (f.nested ? R"("text_config": {)" + sizes + "}" : sizes),
               sharded);
  return kept;
}

double relative(const Matrix<float>& a, const Matrix<double>& b) {
  return (a.cast<double>() - b).cwiseAbs().maxCoeff() / b.cwiseAbs().maxCoeff();
}

/// y of layer n by the library: the block's layer in float, loaded from the folder.
Matrix<float> library_forward(const io::HfModel& model, Index n, const Matrix<float>& x) {
  return model.block(n).with_layer<float>([&](auto& layer) {
    model.load(layer, n);
    return Matrix<float>(layer.forward(x));
  });
}

TEST(HfModel, EveryFamilyAgreesWithTheFloat64Reference) {
  for (const auto& f : families()) {
    SCOPED_TRACE(f.model_type);
    Folder folder(f.model_type);
    const Index layer = f.moe_layers.back();
    const Weights w = write_family(f, folder, layer, 7);
    const auto model = io::HfModel::open(folder.dir());
    EXPECT_EQ(model.moe_layers(), f.moe_layers);
    const auto block = model.block(layer);
    EXPECT_TRUE(block.unsupported().empty());
    EXPECT_EQ(block.experts, f.experts);
    EXPECT_EQ(block.top_k, f.top_k);
    EXPECT_EQ(block.shared_ffn, f.shared_ffn);
    const Matrix<float> x = Eigen::MatrixXf::Random(13, 16);
    const Matrix<double> expected = reference(w, f.rule, x.cast<double>());
    EXPECT_LT(relative(library_forward(model, layer, x), expected), 1e-4);
  }
}

// write_block writes a layer under the family's names (fused and transposed where the family
// stores it so); read back, it gives the same layer.
TEST(HfModel, WriteBlockRoundTripsEveryFamily) {
  for (const auto& f : families()) {
    SCOPED_TRACE(f.model_type);
    Folder folder(f.model_type + "_written"), copy(f.model_type + "_copy");
    const Index layer = f.moe_layers.back();
    write_family(f, folder, layer, 13);
    fs::copy_file(folder.dir() / "config.json", copy.dir() / "config.json");
    const auto model = io::HfModel::open(folder.dir());
    const Matrix<float> x = Eigen::MatrixXf::Random(6, 16);
    const Matrix<float> y = model.block(layer).with_layer<float>([&](auto& l) {
      model.load(l, layer);
      io::HfModel::open_config(copy.dir()).write_block(l, layer, copy.dir() / "model.safetensors");
      return Matrix<float>(l.forward(x));
    });
    EXPECT_EQ(library_forward(io::HfModel::open(copy.dir()), layer, x), y);
  }
}

// moekit-hf forward: x from IN.safetensors (F32 here, BF16 for one family), y to OUT.safetensors.
#ifdef MOEKIT_HF
/// x as it was stored in `dtype` (BF16 rounds it), and y from moekit-hf forward on it for layer n
/// of the folder, with `flags` added to the command.
std::pair<Matrix<float>, Matrix<float>> tool_forward(const Folder& folder, Index n, const Matrix<float>& x, DType dtype,
                                                     const std::string& flags = "") {
  io::SafeTensors in;
  const std::vector<float> xs(x.data(), x.data() + x.size());
  in.add_as("x", {x.rows(), x.cols()}, std::span<const float>(xs), dtype);
  in.write(folder.dir() / "in.safetensors");
  const auto stored = io::SafeTensors::read(folder.dir() / "in.safetensors").values<float>("x");
  const std::string command = std::string(MOEKIT_HF) + " forward " + folder.dir().string() + " --layer " +
                              std::to_string(n) + " --input " + (folder.dir() / "in.safetensors").string() +
                              " --output " + (folder.dir() / "out.safetensors").string() + " " + flags + " > /dev/null";
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  const auto out = io::SafeTensors::read(folder.dir() / "out.safetensors");
  EXPECT_EQ(out.info("y").shape, (std::vector<Index>{x.rows(), x.cols()}));
  EXPECT_EQ(out.info("y").dtype, DType::f32);
  const auto y = out.values<float>("y");
  return {ConstMatrixMap<float>(stored.data(), x.rows(), x.cols()), ConstMatrixMap<float>(y.data(), x.rows(), x.cols())};
}

TEST(HfModel, TheToolsForwardAgreesWithTheFloat64Reference) {
  for (const auto& f : families()) {
    SCOPED_TRACE(f.model_type);
    Folder folder(f.model_type + "_tool");
    const Index layer = f.moe_layers.front();
    const Weights w = write_family(f, folder, layer, 11);
    const auto [x, y] = tool_forward(folder, layer, Eigen::MatrixXf::Random(9, 16),
                                     f.model_type == "olmoe" ? DType::bf16 : DType::f32);
    EXPECT_LT(relative(y, reference(w, f.rule, x.cast<double>())), 1e-4);
  }
}

// --precision int8: the block's layer with int8 experts, within int8's stated bound (3% of the
// output's norm, docs/concepts.md#int8) of the float64 reference; bench runs it (forward only); a
// precision it does not know is named.
TEST(HfModel, TheToolsForwardInInt8StaysWithinItsBound) {
  for (const auto& f : families()) {
    SCOPED_TRACE(f.model_type);
    Folder folder(f.model_type + "_tool_int8");
    const Index layer = f.moe_layers.front();
    const Weights w = write_family(f, folder, layer, 17);
    const auto [x, y] = tool_forward(folder, layer, Eigen::MatrixXf::Random(9, 16), DType::f32, "--precision int8");
    const Matrix<double> expected = reference(w, f.rule, x.cast<double>());
    const double error = (y.cast<double>() - expected).norm() / expected.norm();
    EXPECT_LT(error, test::int8_bound);
    EXPECT_GT(error, 1e-5) << "quantised: not float's output";
    const std::string bench = std::string(MOEKIT_HF) + " bench " + folder.dir().string() + " --layer " +
                              std::to_string(layer) + " --tokens 4 --steps 1 --precision int8";
    EXPECT_EQ(std::system((bench + " | grep -q '_i8), 4 tokens'").c_str()), 0) << bench << ": forward only, in int8";
    const std::string bad = std::string(MOEKIT_HF) + " forward " + folder.dir().string() + " --layer " +
                            std::to_string(layer) + " --input x --output y --precision fp4 2>&1";
    EXPECT_EQ(std::system((bad + " | grep -q 'moekit-hf: --precision fp4; expected f32, bf16 or int8'").c_str()), 0)
        << "the unknown precision is named";
  }
}
#endif

TEST(HfModel, OneFileWithoutAnIndexReadsToo) {
  const auto f = families()[1];  // Qwen2-MoE
  Folder folder("single");
  const Weights w = write_family(f, folder, 2, 3, false);
  const auto model = io::HfModel::open(folder.dir());
  const Matrix<float> x = Eigen::MatrixXf::Random(5, 16);
  EXPECT_LT(relative(library_forward(model, 2, x), reference(w, f.rule, x.cast<double>())), 1e-4);
}

/// The fixtures written as folders under their families' names (by write_block, F64) and read
/// back reproduce the fixtures' y.
TEST(HfModel, FixturesWrittenAsFoldersReproduceTheirOutput) {
  struct Case {
    std::string file, config;
  };
  const std::vector<Case> cases{
      {"mixtral", R"("model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 1, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "intermediate_size": 48)"},
      {"qwen2_moe", R"("model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 1, "num_experts": 6,
                       "num_experts_per_tok": 2, "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56,
                       "norm_topk_prob": false)"},
      {"deepseek_v3", R"("model_type": "deepseek_v3", "hidden_size": 32, "num_hidden_layers": 1, "n_routed_experts": 16,
                         "num_experts_per_tok": 4, "moe_intermediate_size": 40, "n_shared_experts": 1, "n_group": 4,
                         "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": true)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    const fs::path fixture = fs::path(MOEKIT_FIXTURES_DIR) / (c.file + ".safetensors");
    const auto file = io::SafeTensors::read(fixture);
    const auto block = io::HfBlock::from(file);
    Folder folder(c.file + "_fixture");
    std::ofstream(folder.dir() / "config.json") << "{" << c.config << "}";
    block.with_layer<double>([&](auto& layer) {
      block.load(layer, file, fixture);
      const auto model = io::HfModel::open_config(folder.dir());
      model.write_block(layer, 0, folder.dir() / "model.safetensors", DType::f64);
    });
    const auto model = io::HfModel::open(folder.dir());
    const Matrix<double> y = model.block(0).with_layer<double>([&](auto& layer) {
      model.load(layer, 0);
      return Matrix<double>(layer.forward(block.activations<double>(file, "x")));
    });
    EXPECT_LT(io::relative_error(std::span<const double>(y.data(), y.size()), file.values<double>("y")), 1e-6);
  }
}

// ---- errors: each names the file, the tensor and what was expected ---------------------------

class HfModelErrors : public ::testing::Test {
 protected:
  void SetUp() override { write_family(family, folder, 1, 5); }
  /// Rewrites one shard with `change` applied to its tensors.
  void rewrite_shard(const std::string& shard, auto change) {
    const auto path = folder.dir() / shard;
    const auto old = io::SafeTensors::read(path);
    io::SafeTensors updated;
    for (const auto& name : old.names()) {
      const auto& info = old.info(name);
      change(updated, name, info, old);
    }
    updated.write(path);
  }
  std::string shard_of(const std::string& name) {
    std::ifstream in(folder.dir() / "model.safetensors.index.json");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto at = text.find("\"" + name + "\": \"");
    return text.substr(at + name.size() + 5, text.find('"', at + name.size() + 5) - (at + name.size() + 5));
  }
  static void copy(io::SafeTensors& to, const std::string& name, const io::TensorInfo& info, const io::SafeTensors& from) {
    const auto bytes = from.bytes(name);
    to.add_raw(name, info.shape, info.dtype, std::as_bytes(bytes));
  }
  std::string read_layer(Index n = 1) {
    return message_of([&] { io::HfModel::open(folder.dir()).read_block<float>(n); });
  }

  Family family = families()[5];  // DeepSeek-V3: layer 0 dense, a bias, a shared expert
  Folder folder{"errors"};
};

TEST_F(HfModelErrors, AnUnknownModelType) {
  std::ofstream(folder.dir() / "config.json") << R"({"model_type": "llama", "hidden_size": 16})";
  EXPECT_EQ(message_of([&] { io::HfModel::open(folder.dir()); }),
            "moekit::HfModel: '" + (folder.dir() / "config.json").string() +
                "' has model_type = 'llama'; expected one of mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, "
                "deepseek_v3, llama4_text, llama4, gpt_oss (docs/models.md)");
}

TEST_F(HfModelErrors, AnotherClampOfGptOssIsNamed) {
  std::ofstream(folder.dir() / "config.json")
      << R"({"model_type": "gpt_oss", "hidden_size": 16, "num_hidden_layers": 1, "num_local_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": 8, "swiglu_limit": 10.0})";
  EXPECT_EQ(read_layer(0), "moekit::HfModel: layer 0 of '" + folder.dir().string() +
                               "' (gpt_oss) needs swiglu_limit = '10' (a convention moekit does not know); "
                               "moekit does not do this (docs/models.md)");
}

TEST_F(HfModelErrors, ADenseLayerAskedForAsMoE) {
  EXPECT_EQ(read_layer(0), "moekit::HfModel: layer 0 of '" + folder.dir().string() +
                               "' is dense (first_k_dense_replace = 1); expected an MoE layer: 1, 2");
  EXPECT_EQ(read_layer(3), "moekit::HfModel: layer 3 of '" + folder.dir().string() +
                               "'; expected 0 to 2 (num_hidden_layers = 3)");
}

TEST_F(HfModelErrors, AMissingTensor) {
  const std::string name = "model.layers.1.mlp.experts.3.up_proj.weight", shard = shard_of(name);
  rewrite_shard(shard, [&](io::SafeTensors& to, const std::string& n, const io::TensorInfo& info, const io::SafeTensors& from) {
    if (n != name) copy(to, n, info, from);
  });
  EXPECT_EQ(read_layer(), "moekit::HfModel: '" + (folder.dir() / shard).string() + "' has no tensor '" + name +
                              "'; expected an expert's up_proj there (model.safetensors.index.json places it in this file)");
}

TEST_F(HfModelErrors, AShapeThatDisagreesWithTheConfig) {
  const std::string name = "model.layers.1.mlp.shared_experts.down_proj.weight", shard = shard_of(name);
  rewrite_shard(shard, [&](io::SafeTensors& to, const std::string& n, const io::TensorInfo& info, const io::SafeTensors& from) {
    if (n != name) return copy(to, n, info, from);
    const std::vector<double> values(static_cast<std::size_t>(16 * 13), 0.0);
    to.add(n, {16, 13}, std::span<const double>(values));
  });
  EXPECT_EQ(read_layer(), "moekit::HfModel: '" + (folder.dir() / shard).string() + "' tensor '" + name +
                              "' is [16,13]; expected [16,12] (the shared expert's down_proj, from config.json's "
                              "hidden_size and the shared expert's width)");
}

TEST_F(HfModelErrors, AnUnsupportedDtype) {
  const std::string name = "model.layers.1.mlp.experts.0.gate_proj.weight", shard = shard_of(name);
  rewrite_shard(shard, [&](io::SafeTensors& to, const std::string& n, const io::TensorInfo& info, const io::SafeTensors& from) {
    if (n != name) return copy(to, n, info, from);
    const std::vector<std::byte> fp8(static_cast<std::size_t>(12 * 16), std::byte{0x38});
    to.add_raw(n, info.shape, DType::f8_e4m3, fp8);
  });
  EXPECT_EQ(read_layer(), "moekit::SafeTensors: '" + (folder.dir() / shard).string() + "' tensor '" + name +
                              "' has dtype F8_E4M3; expected F32, F64, BF16 or F16");
}

TEST_F(HfModelErrors, QuantisedBlocksAreNamed) {
  const std::string name = "model.layers.1.mlp.experts.2.down_proj.weight", shard = shard_of(name);
  rewrite_shard(shard, [&](io::SafeTensors& to, const std::string& n, const io::TensorInfo& info, const io::SafeTensors& from) {
    if (n != name) return copy(to, n, info, from);
    const std::vector<std::byte> blocks(96, std::byte{0x11});
    to.add_raw(n + "_blocks", {16, 6}, DType::u8, blocks);
  });
  EXPECT_EQ(read_layer(), "moekit::HfModel: '" + (folder.dir() / shard).string() + "' has no tensor '" + name +
                              "' but '" + name + "_blocks' (quantised blocks, such as MXFP4, which moekit does not read: "
                              "dequantize the model to BF16 first); expected an expert's down_proj there "
                              "(model.safetensors.index.json places it in this file)");
}

TEST_F(HfModelErrors, AConventionMoekitDoesNotDo) {
  std::ifstream in(folder.dir() / "config.json");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  text.replace(text.find("\"noaux_tc\""), 10, "\"greedy_v4\"");
  std::ofstream(folder.dir() / "config.json") << text;
  EXPECT_EQ(read_layer(), "moekit::HfModel: layer 1 of '" + folder.dir().string() +
                              "' (deepseek_v3) needs topk_method = 'greedy_v4' (a convention moekit does not know); "
                              "moekit does not do this (docs/models.md)");
}

TEST_F(HfModelErrors, AMissingConfigKeyAndNoWeights) {
  std::ofstream(folder.dir() / "config.json") << R"({"model_type": "deepseek_v3", "num_hidden_layers": 3})";
  EXPECT_EQ(read_layer(), "moekit::HfModel: '" + (folder.dir() / "config.json").string() +
                              "' has no hidden_size; expected it in a model of this family");
  fs::remove(folder.dir() / "model.safetensors.index.json");
  EXPECT_EQ(read_layer(), "moekit::HfModel: '" + folder.dir().string() +
                              "' has neither model.safetensors nor model.safetensors.index.json; expected the weights "
                              "in one of them");
}

}  // namespace
}  // namespace moekit::test
