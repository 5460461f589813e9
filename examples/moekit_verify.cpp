// moekit-verify: rebuilds a Hugging Face MoE block from a fixture file (the layout of
// tests/fixtures/hf/README.md), runs it forward and backward, and prints one JSON line per file with
// the relative error of y, dx and each gradient (largest absolute difference over the largest
// magnitude in the reference tensor).
//
//   moekit-verify FILE.safetensors [...]
//
// Exit status: 0 all within 1e-6; 1 some error above it; 2 a file of conventions moekit does not
// implement (the message names each by its metadata key and value) or cannot read.
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

namespace {

constexpr double limit = 1e-6;

/// Builds the block as a layer in double (a selection bias, router.bias, is AuxFree's state),
/// loads the fixture's tensors, runs forward and backward, and prints the errors of y, dx, each
/// gradient the fixture has and the routing (matched by expert).
bool verify(const moekit::io::SafeTensors& file, const moekit::io::HfBlock& b, const std::string& path) {
  return b.with_layer<double>([&](auto& layer) {
    b.load(layer, file, path);
    const moekit::Matrix<double> y = layer.forward(b.activations<double>(file, "x"));
    const auto routing = moekit::io::routing_difference(layer.routing(), file);
    const moekit::Matrix<double> dx = layer.backward(b.activations<double>(file, "dy"));

    std::vector<std::pair<std::string, double>> errors;
    auto flat = [](const moekit::Matrix<double>& m) { return std::span<const double>(m.data(), m.size()); };
    errors.emplace_back("y", moekit::io::relative_error(flat(y), file.values<double>("y")));
    errors.emplace_back("dx", moekit::io::relative_error(flat(dx), file.values<double>("dx")));
    for (const auto& g : layer.gradients())
      if (const std::string name = "grad." + moekit::io::HfBlock::tensor_name(g.name()); file.contains(name))
        errors.emplace_back(name, moekit::io::relative_error(g.values(), file.values<double>(name)));
    errors.emplace_back("topk.weight", routing.weight_error);

    bool ok = routing.mismatches == 0;
    std::printf("{\"file\":\"%s\",\"family\":\"%s\",\"layer\":\"%s\"", path.c_str(), b.family.c_str(),
                b.layer_type().c_str());
    for (const auto& [name, e] : errors) {
      std::printf(",\"%s\":%.3g", name.c_str(), e);
      ok = ok && e <= limit;
    }
    std::printf(",\"topk.index_mismatches\":%ld,\"limit\":%g,\"ok\":%s}\n", routing.mismatches, limit,
                ok ? "true" : "false");
    return ok;
  });
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
        std::fprintf(stderr, "moekit-verify: '%s' (family %s) needs %s; moekit does not support %s\n",
                     path.c_str(), block.family.c_str(), list.c_str(), missing.size() > 1 ? "these" : "this");
        status = std::max(status, 2);
        continue;
      }
      if (!verify(file, block, path)) status = std::max(status, 1);
    } catch (const moekit::error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      status = 2;
    }
  }
  return status;
}
