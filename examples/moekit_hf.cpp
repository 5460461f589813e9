// moekit-hf: the MoE layers of a downloaded Hugging Face model folder (config.json and
// model.safetensors, or model.safetensors.index.json and its shards), as moekit layers.
//
//   moekit-hf inspect DIR
//       the family, which layers are MoE, the block's sizes, routing and shared expert, the
//       MoELayer type it maps to, and how its tensors are stored
//   moekit-hf forward DIR --layer N --input IN.safetensors --output OUT.safetensors [--precision P]
//       y [T,H] (F32) of layer N's MoE block for x [T,H] (F32, BF16, F16 or F64) from IN, in float
//   moekit-hf bench DIR --layer N --tokens T [--steps S] [--precision P]
//       layer N's forward and forward + backward times on T random tokens, each step beside a step
//       of its limit (the layer benchmark's: the same SwiGLU GEMMs on one expert's weights, in oneDNN
//       where it was found at build time)
//   --precision f32 (default), bf16 (the experts' products on bf16 operands) or int8 (weight-only
//       int8 experts, forward only), the limit in the same precision
//
// Exit status: 0 done; 2 bad arguments, or a folder, layer or file moekit cannot read (the
// message says what and where).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <moekit/io/hf_model.hpp>
#include <moekit/moekit.hpp>

#include <tbb/task_arena.h>

#include "limit_gemms.hpp"

namespace {

using moekit::Index;

constexpr const char* usage =
    "usage: moekit-hf inspect DIR\n"
    "       moekit-hf forward DIR --layer N --input IN.safetensors --output OUT.safetensors [--precision P]\n"
    "       moekit-hf bench DIR --layer N --tokens T [--steps S] [--precision P]\n"
    "       P: f32 (default), bf16 or int8\n";

/// --name value pairs after the folder.
std::map<std::string, std::string> options(int argc, char** argv, int first) {
  std::map<std::string, std::string> out;
  for (int i = first; i < argc; i += 2) {
    const std::string name = argv[i];
    moekit::require(name.starts_with("--") && i + 1 < argc, "moekit-hf: '", name, "'; expected --option value\n",
                    usage);
    out[name.substr(2)] = argv[i + 1];
  }
  return out;
}

std::string option(const std::map<std::string, std::string>& opts, const std::string& name) {
  const auto it = opts.find(name);
  moekit::require(it != opts.end(), "moekit-hf: no --", name, "; expected it\n", usage);
  return it->second;
}

Index number(const std::map<std::string, std::string>& opts, const std::string& name) {
  const std::string text = option(opts, name);
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  moekit::require(!text.empty() && *end == '\0' && v >= 0, "moekit-hf: --", name, " ", text,
                  "; expected a non-negative integer");
  return v;
}

/// --precision: f32 (the default), bf16 or int8.
moekit::Precision precision(const std::map<std::string, std::string>& opts) {
  const std::string text = opts.contains("precision") ? opts.at("precision") : "f32";
  if (text == "bf16") return moekit::Precision::bf16;
  if (text == "int8") return moekit::Precision::int8;
  moekit::require(text == "f32", "moekit-hf: --precision ", text, "; expected f32, bf16 or int8");
  return moekit::Precision::scalar;
}

/// f(layer) with block b's float layer, its experts in precision p.
template <class F>
void with_layer_in(const moekit::io::HfBlock& b, moekit::Precision p, F&& f) {
  if (p == moekit::Precision::bf16) return b.with_layer<float, moekit::Precision::bf16>(f);
  if (p == moekit::Precision::int8) return b.with_layer<float, moekit::Precision::int8>(f);
  return b.with_layer<float>(f);
}

std::string ranges(const std::vector<Index>& layers) {
  std::string out;
  for (std::size_t i = 0; i < layers.size();) {
    std::size_t j = i;
    while (j + 1 < layers.size() && layers[j + 1] == layers[j] + 1) ++j;
    out += (out.empty() ? "" : ", ") + std::to_string(layers[i]) + (j > i ? "-" + std::to_string(layers[j]) : "");
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

int inspect(const moekit::io::HfModel& model) {
  const auto moe = model.moe_layers();
  std::printf("folder:  %s\nfamily:  %s\nlayers:  %lld; MoE: %s\n", model.folder().c_str(),
              std::string(model.family().model_type).c_str(), static_cast<long long>(model.layers()),
              ranges(moe).c_str());
  for (Index n = 0; n < model.layers(); ++n)
    if (const auto why = model.dense_because(n)) std::printf("         layer %lld is dense: %s\n", static_cast<long long>(n), why->c_str());
  if (moe.empty()) return 0;
  const auto b = model.block(moe.front());
  std::printf("block:   hidden %lld, %lld experts of width %lld, top-%d, %s%s, scale %g", static_cast<long long>(b.hidden),
              static_cast<long long>(b.experts), static_cast<long long>(b.ffn), b.top_k,
              std::string(moekit::to_string(b.score)).c_str(), b.normalize ? ", renormalised" : "", b.scale);
  if (b.groups > 1) std::printf(", %d groups (%d kept) by %s", b.groups, b.groups_kept, b.group_score.c_str());
  if (b.selection_bias) std::printf(", selection bias");
  if (b.weight_at_input) std::printf(", weights scale the experts' input");
  if (b.logit_bias) std::printf(", a bias on the logits");
  std::printf("\nexperts: %s", b.expert_unit.c_str());
  std::printf("\nshared:  %s", b.has_shared() ? b.shared_expert.c_str() : "none");
  if (b.has_shared()) std::printf(", width %lld", static_cast<long long>(b.shared_ffn));
  std::printf("\nmoekit:  %s, float or double\n", b.layer_type().c_str());
  if (const auto missing = b.unsupported(); !missing.empty())
    for (const auto& m : missing) std::printf("refused: %s\n", m.c_str());
  std::printf("tensors of layer %lld:\n", static_cast<long long>(moe.front()));
  for (const auto& t : model.stored(moe.front())) {
    const std::string count = t.count > 1 ? " (×" + std::to_string(t.count) + ", one per expert)" : "";
    if (t.file.empty())
      std::printf("  %-20s %s%s: missing\n", t.moekit.c_str(), t.on_disk.c_str(), count.c_str());
    else
      std::printf("  %-20s %s%s: %s %s in %s\n", t.moekit.c_str(), t.on_disk.c_str(), count.c_str(),
                  std::string(moekit::io::to_string(t.dtype)).c_str(), moekit::shape_string(t.shape).c_str(),
                  t.file.filename().c_str());
  }
  return 0;
}

int forward(const moekit::io::HfModel& model, const std::map<std::string, std::string>& opts) {
  const Index n = number(opts, "layer");
  const std::string input = option(opts, "input"), output = option(opts, "output");
  const moekit::Precision p = precision(opts);
  const auto b = model.block(n);
  const auto in = moekit::io::SafeTensors::read(input);
  moekit::require(in.contains("x"), "moekit-hf: '", input, "' has no tensor 'x'; expected x [T,", b.hidden, "]");
  const auto& info = in.info("x");
  moekit::require(info.shape.size() == 2 && info.shape[1] == b.hidden, "moekit-hf: '", input, "' tensor 'x' is ",
                  moekit::shape_string(info.shape), "; expected [T,", b.hidden, "] (hidden_size = ", b.hidden, ")");
  const auto values = in.values<float>("x");
  const moekit::Matrix<float> x = moekit::ConstMatrixMap<float>(values.data(), info.shape[0], b.hidden);
  std::string name;
  with_layer_in(b, p, [&](auto& layer) {
    name = layer.name();
    model.load(layer, n);
    const moekit::Matrix<float> y = layer.forward(x);
    moekit::io::SafeTensors out;
    out.metadata() = {{"layer", std::to_string(n)}, {"moekit", b.layer_type()}};
    out.add("y", {y.rows(), y.cols()}, std::span<const float>(y.data(), static_cast<std::size_t>(y.size())));
    out.write(output);
  });
  std::printf("moekit-hf: layer %lld (%s: %s), %lld tokens: y written to %s\n", static_cast<long long>(n),
              b.layer_type().c_str(), name.c_str(), static_cast<long long>(info.shape[0]), output.c_str());
  return 0;
}

/// The median of each step's seconds.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int bench(const moekit::io::HfModel& model, const std::map<std::string, std::string>& opts) {
  using Clock = std::chrono::steady_clock;
  const Index n = number(opts, "layer"), tokens = number(opts, "tokens");
  const Index steps = opts.contains("steps") ? number(opts, "steps") : 10;
  moekit::require(tokens >= 1 && steps >= 1, "moekit-hf: --tokens ", tokens, " --steps ", steps,
                  "; expected both at least 1");
  const auto b = model.block(n);
  const moekit::Precision p = precision(opts);
  const int threads = tbb::this_task_arena::max_concurrency();
  // The limit: the routed rows' SwiGLU on one expert's weights, and the shared expert's on all tokens.
  probes::LimitGemms routed(tokens * b.top_k, b.hidden, b.ffn, p);
  std::optional<probes::LimitGemms> shared;
  if (b.has_shared()) shared.emplace(tokens, b.hidden, b.shared_ffn, p);
  auto seconds = [](auto&& f) {
    const auto start = Clock::now();
    f();
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  with_layer_in(b, p, [&](auto& layer) {
    constexpr bool trains = !std::remove_reference_t<decltype(layer)>::quantises_weights;  // int8: forward only
    model.load(layer, n);
    const moekit::Matrix<float> x = moekit::Matrix<float>::Random(tokens, b.hidden);
    const moekit::Matrix<float> dy = moekit::Matrix<float>::Random(tokens, b.hidden);
    moekit::Matrix<float> y(tokens, b.hidden), dx(tokens, b.hidden);
    std::printf("moekit-hf bench: layer %lld (%s: %s), %lld tokens, %d threads, median of %lld steps; limit: %s%s\n",
                static_cast<long long>(n), b.layer_type().c_str(), layer.name().c_str(), static_cast<long long>(tokens),
                threads, static_cast<long long>(steps), probes::limit_label().c_str(),
                p == moekit::Precision::scalar || probes::limit_has_precisions ? "" : " (in float)");
    for (const bool backward : {false, true}) {
      if (backward && !trains) break;
      std::vector<double> layer_s, limit_s;
      for (Index s = -1; s < steps; ++s) {  // step -1 warms up
        const double l = seconds([&] {
          layer.forward(x, y);
          if constexpr (trains)
            if (backward) layer.backward(dy, dx);
        });
        const double m = seconds([&] {
          routed.forward(threads);
          if (shared) shared->forward(threads);
          if (backward) {
            routed.backward(threads);
            if (shared) shared->backward(threads);
          }
        });
        if (s >= 0) layer_s.push_back(l), limit_s.push_back(m);
      }
      const double layer_ms = 1e3 * median(layer_s), limit_ms = 1e3 * median(limit_s);
      std::printf("  %-8s %9.3f ms  (limit %9.3f ms, %5.1f%% of it), %.0f tokens/s\n", backward ? "fwd+bwd" : "fwd",
                  layer_ms, limit_ms, 100.0 * limit_ms / layer_ms, 1e3 * double(tokens) / layer_ms);
    }
  });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fputs(usage, stderr);
    return 2;
  }
  const std::string command = argv[1];
  try {
    const auto model = moekit::io::HfModel::open(argv[2]);
    if (command == "inspect" && argc == 3) return inspect(model);
    if (command == "forward") return forward(model, options(argc, argv, 3));
    if (command == "bench") return bench(model, options(argc, argv, 3));
    std::fprintf(stderr, "moekit-hf: '%s'; expected inspect, forward or bench\n%s", command.c_str(), usage);
    return 2;
  } catch (const moekit::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
