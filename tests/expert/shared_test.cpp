// Shared experts: the layer's output is the routed experts' plus the shared expert's, written
// out here as plain loops (ungated, and scaled by σ(x·w)); the gradients of x and of every
// parameter by central differences; names, shapes, files, and the refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <tuple>
#include <vector>
#include <unistd.h>

#include <tbb/task_arena.h>

#include <moekit/moekit.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

constexpr LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .shared_ffn = 7, .seed = 3};

/// The shared expert's output for token t, from the formula: down · (silu(gate·x) ⊙ up·x),
/// times σ(w·x) when gated.
template <class Layer>
Matrix<double> shared_by_hand(const Layer& layer, const Matrix<double>& x, bool gated) {
  const auto& gate = layer.parameter("shared.gate");
  const auto& up = layer.parameter("shared.up");
  const auto& down = layer.parameter("shared.down");
  const Index hidden = x.cols(), width = gate.shape()[1];
  Matrix<double> out = Matrix<double>::Zero(x.rows(), hidden);
  for (Index t = 0; t < x.rows(); ++t) {
    double scale = 1;
    if (gated) {
      double a = 0;
      for (Index h = 0; h < hidden; ++h) a += layer.parameter("shared.output_gate").values()[h] * x(t, h);
      scale = 1 / (1 + std::exp(-a));
    }
    for (Index f = 0; f < width; ++f) {
      double g = 0, u = 0;
      for (Index h = 0; h < hidden; ++h) {
        g += gate.values()[f * hidden + h] * x(t, h);
        u += up.values()[f * hidden + h] * x(t, h);
      }
      const double hidden_unit = g / (1 + std::exp(-g)) * u;
      for (Index h = 0; h < hidden; ++h) out(t, h) += scale * down.values()[h * width + f] * hidden_unit;
    }
  }
  return out;
}

template <SharedGate G>
void expect_routed_plus_shared() {
  using Layer = MoELayer<TopK<2>, NoBalance, Shared<G>, double>;
  using Routed = MoELayer<TopK<2>, NoBalance, double>;
  Layer layer(config);
  LayerConfig routed_config = config;
  routed_config.shared_ffn = 0;
  Routed routed(routed_config);
  for (const auto& p : routed.parameters()) routed.parameter(p.name()) = layer.parameter(p.name());
  const Matrix<double> x = random_matrix(9, config.hidden, 1);
  const Matrix<double> expected = routed.forward(x) + shared_by_hand(layer, x, G == SharedGate::sigmoid);
  EXPECT_LT((layer.forward(x) - expected).cwiseAbs().maxCoeff(), 1e-13);
}

TEST(SharedExpert, AddsItsOutputToTheRoutedExperts) {
  expect_routed_plus_shared<SharedGate::none>();
  expect_routed_plus_shared<SharedGate::sigmoid>();
}

template <SharedGate G>
void expect_gradients_match_finite_differences() {
  MoELayer<TopK<2>, AuxLoss, Shared<G>, double> layer(config);
  const auto reports = check_gradients(layer, random_matrix(7, config.hidden, 2), random_matrix(7, config.hidden, 3));
  for (const auto& r : reports) EXPECT_LT(r.error, 1e-6) << r.name;
  EXPECT_EQ(reports.size(), G == SharedGate::sigmoid ? 9u : 8u);  // x, router, 3 shared (+ gate), 3 routed
}

TEST(SharedExpert, GradientsMatchFiniteDifferences) {
  expect_gradients_match_finite_differences<SharedGate::none>();
  expect_gradients_match_finite_differences<SharedGate::sigmoid>();
}

TEST(SharedExpert, SameBitsOnOneThreadAndOnAll) {
  using Layer = MoELayer<TopK<2>, Shared<SharedGate::sigmoid>, float>;
  const LayerConfig wide{.hidden = 64, .ffn = 48, .experts = 4, .shared_ffn = 96, .seed = 8};
  const Matrix<float> x = random_matrix<float>(600, wide.hidden, 9), dy = random_matrix<float>(600, wide.hidden, 10);
  auto run = [&] {
    Layer layer(wide, Shared<SharedGate::sigmoid>{{.options = {.row_tile = 64, .column_tile = 32}}});
    std::pair<Matrix<float>, Matrix<float>> out{layer.forward(x), Matrix<float>()};
    out.second = layer.backward(dy);
    std::vector<float> grads;
    for (const auto& g : layer.gradients()) grads.insert(grads.end(), g.values().begin(), g.values().end());
    return std::tuple(out.first, out.second, grads);
  };
  const auto all = run();
  const auto one = tbb::task_arena(1).execute(run);
  EXPECT_TRUE(std::get<0>(all) == std::get<0>(one));
  EXPECT_TRUE(std::get<1>(all) == std::get<1>(one));
  EXPECT_TRUE(std::get<2>(all) == std::get<2>(one));
}

TEST(SharedExpert, ParametersAreNamedSharedAndHeldAsOneExpert) {
  MoELayer<TopK<2>, Shared<SharedGate::sigmoid>, double> layer(config);
  std::vector<std::string> names;
  for (const auto& p : layer.parameters()) names.push_back(p.name());
  EXPECT_EQ(names, (std::vector<std::string>{"router.weight", "shared.gate", "shared.up", "shared.down",
                                              "shared.output_gate", "experts.gate", "experts.up", "experts.down"}));
  EXPECT_EQ(layer.parameter("shared.gate").shape(), (std::vector<Index>{1, 7, 6}));
  EXPECT_EQ(layer.parameter("shared.down").shape(), (std::vector<Index>{1, 6, 7}));
  EXPECT_EQ(layer.parameter("shared.output_gate").shape(), (std::vector<Index>{1, 6}));
  EXPECT_EQ(decltype(layer)::name(), "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_SharedSigmoidGated_f64");
}

TEST(SharedExpert, OutputMayOverwriteTheInput) {
  MoELayer<TopK<2>, Shared<>, double> layer(config);
  const Matrix<double> x = random_matrix(5, config.hidden, 4);
  const Matrix<double> y = layer.forward(x);
  Matrix<double> in_place = x;
  layer.forward(in_place, in_place);
  EXPECT_EQ(in_place, y);
}

TEST(SharedExpert, SavesLoadsAndReadsHuggingFaceShapes) {
  using Layer = MoELayer<TopK<2>, Shared<SharedGate::sigmoid>, double>;
  const auto dir = std::filesystem::temp_directory_path() / ("moekit_shared_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  Layer saved(config), loaded({.hidden = 6, .ffn = 5, .experts = 4, .shared_ffn = 7, .seed = 99});
  saved.save(dir / "layer.safetensors");
  loaded.load(dir / "layer.safetensors");
  for (const auto& p : saved.parameters()) EXPECT_EQ(p.values()[0], loaded.parameter(p.name()).values()[0]) << p.name();

  // [F_s,H] rather than [1,F_s,H]: a Hugging Face checkpoint's shared expert.
  auto file = io::SafeTensors::read(dir / "layer.safetensors");
  io::SafeTensors squeezed;
  for (const auto& p : saved.parameters()) {
    auto shape = p.shape();
    if (p.name().starts_with("shared.") && shape.size() == 3) shape.erase(shape.begin());
    squeezed.add(p.name(), shape, p.values());
  }
  Layer from_squeezed({.hidden = 6, .ffn = 5, .experts = 4, .shared_ffn = 7, .seed = 5});
  from_squeezed.load(squeezed, "squeezed");
  const Matrix<double> x = random_matrix(3, config.hidden, 6);
  EXPECT_EQ(from_squeezed.forward(x), saved.forward(x));
  std::filesystem::remove_all(dir);
}

TEST(SharedExpert, RefusesAWidthThatDoesNotMatchThePolicies) {
  auto message = [](auto build) {
    try {
      build();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message([] { MoELayer<TopK<2>, Shared<>, double> layer({.hidden = 6, .ffn = 5, .experts = 4}); }),
            "moekit::Shared: shared_ffn = 0; expected the shared expert's width, at least 1 "
            "(LayerConfig::shared_ffn)");
  EXPECT_EQ(message([] { MoELayer<TopK<2>, double> layer(config); }),
            "moekit::MoELayer: shared_ffn = 7 with no shared expert; expected 0, or a Shared<> policy among the "
            "layer's policies");
  EXPECT_EQ(message([] {
              MoELayer<TopK<2>, Shared<>, double> layer({.hidden = 6, .ffn = 5, .experts = 4, .shared_ffn = -2});
            }),
            "moekit::MoELayer: shared_ffn = -2 with hidden = 6; expected shared_ffn >= 0 and shared_ffn × hidden "
            "below 2^62");
}

}  // namespace
}  // namespace moekit::test
