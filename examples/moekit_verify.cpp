// moekit-verify: rebuilds a Hugging Face MoE block from a fixture file (the layout of
// tests/fixtures/hf/README.md), runs it forward and backward, and prints one JSON line per file with
// the relative error of y, dx and each gradient (largest absolute difference over the largest
// magnitude in the reference tensor).
//
//   moekit-verify FILE.safetensors [...]
//
// Exit status: 0 all within 1e-6; 1 some error above it; 2 a file moekit cannot build yet
// (the message names what is missing) or cannot read.
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <moekit/io/hf_fixture.hpp>
#include <moekit/moekit.hpp>

namespace {

constexpr double limit = 1e-6;

/// A selection bias (router.bias) is AuxFree's state, which load() reads; else no balancer.
template <int K, class Balancer>
bool verify(const moekit::io::SafeTensors& file, const moekit::io::HfBlock& b, const std::string& path) {
  using Layer = moekit::MoELayer<moekit::TopK<K>, Balancer, moekit::Dropless, moekit::GroupedGemm, double>;
  Layer layer({.hidden = b.hidden, .ffn = b.ffn, .experts = b.experts},
              moekit::TopK<K>{{.score = b.score, .normalize = b.normalize, .scale = b.scale, .groups = b.groups,
                               .groups_kept = b.groups_kept, .group_score = b.group_rule()}});
  layer.load(path);
  const moekit::Matrix<double> y = layer.forward(b.activations<double>(file, "x"));
  const moekit::Matrix<double> dx = layer.backward(b.activations<double>(file, "dy"));

  std::vector<std::pair<std::string, double>> errors;
  auto flat = [](const moekit::Matrix<double>& m) { return std::span<const double>(m.data(), m.size()); };
  errors.emplace_back("y", moekit::io::relative_error(flat(y), file.values<double>("y")));
  errors.emplace_back("dx", moekit::io::relative_error(flat(dx), file.values<double>("dx")));
  for (const auto& g : layer.gradients())
    errors.emplace_back("grad." + g.name(), moekit::io::relative_error(g.values(), file.values<double>("grad." + g.name())));
  if (file.contains("topk.weight"))
    errors.emplace_back("topk.weight", moekit::io::relative_error(layer.routing().weight, file.values<double>("topk.weight")));

  bool ok = true;
  std::printf("{\"file\":\"%s\",\"family\":\"%s\"", path.c_str(), b.family.c_str());
  for (const auto& [name, e] : errors) {
    std::printf(",\"%s\":%.3g", name.c_str(), e);
    ok = ok && e <= limit;
  }
  if (file.contains("topk.index")) {
    const auto index = file.integers("topk.index");
    long mismatches = 0;
    for (std::size_t i = 0; i < index.size(); ++i) mismatches += layer.routing().index[i] != index[i];
    std::printf(",\"topk.index_mismatches\":%ld", mismatches);
    ok = ok && mismatches == 0;
  }
  std::printf(",\"limit\":%g,\"ok\":%s}\n", limit, ok ? "true" : "false");
  return ok;
}

template <int... Ks>
bool verify_any_k(const moekit::io::SafeTensors& file, const moekit::io::HfBlock& b,
                  const std::string& path, std::integer_sequence<int, Ks...>) {
  bool ok = false, found = false;
  ((b.top_k == Ks + 1 ? (found = true, ok = b.selection_bias ? verify<Ks + 1, moekit::AuxFree>(file, b, path)
                                                              : verify<Ks + 1, moekit::NoBalance>(file, b, path))
                      : false),
   ...);
  if (!found) moekit::fail("moekit-verify: topk = ", b.top_k, "; expected 1 to ", sizeof...(Ks));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: moekit-verify FILE.safetensors [...]\n");
    return 2;
  }
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string path = argv[i];
    try {
      const auto file = moekit::io::SafeTensors::read(path);
      const auto block = moekit::io::HfBlock::from(file);
      if (const auto missing = block.unsupported(); !missing.empty()) {
        std::string list;
        for (const auto& m : missing) {
          if (!list.empty()) list += "; ";
          list += m;
        }
        std::fprintf(stderr, "moekit-verify: '%s' (family %s) needs %s; moekit does not support %s yet\n",
                     path.c_str(), block.family.c_str(), list.c_str(), missing.size() > 1 ? "these" : "this");
        status = std::max(status, 2);
        continue;
      }
      if (!verify_any_k(file, block, path, std::make_integer_sequence<int, 8>{})) status = std::max(status, 1);
    } catch (const moekit::error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      status = 2;
    }
  }
  return status;
}
