// Bad input gets a moekit::error that names the value and what was expected.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"

namespace moekit::test {
namespace {

using Layer = MoELayer<TopK<2>, double>;

TEST(Errors, WrongInputWidth) {
  Layer layer({.hidden = 8, .ffn = 4, .experts = 4});
  EXPECT_EQ(message_of([&] { layer.forward(Matrix<double>::Zero(3, 7)); }),
            "moekit::MoELayer::forward: x is [3,7]; expected [3,8] (tokens × hidden)");
}

TEST(Errors, MoreChoicesThanExperts) {
  EXPECT_EQ(message_of([] { MoELayer<TopK<4>>({.hidden = 8, .ffn = 4, .experts = 3}); }),
            "moekit::TopK: K = 4 but the layer has 3 experts; expected K <= experts");
}

TEST(Errors, ZeroExpertsOrWidths) {
  EXPECT_EQ(message_of([] { Layer({.hidden = 8, .ffn = 4, .experts = 0}); }),
            "moekit::MoELayer: experts = 0; expected at least 1");
  EXPECT_EQ(message_of([] { Layer({.hidden = 0, .ffn = 4, .experts = 2}); }),
            "moekit::MoELayer: hidden = 0; expected at least 1");
  EXPECT_EQ(message_of([] { Layer({.hidden = 8, .ffn = -1, .experts = 2}); }),
            "moekit::MoELayer: ffn = -1; expected at least 1");
}

TEST(Errors, NonFiniteInputNamesItsPosition) {
  Layer layer({.hidden = 4, .ffn = 4, .experts = 4});
  Matrix<double> x = Matrix<double>::Zero(3, 4);
  x(2, 1) = NAN;
  EXPECT_EQ(message_of([&] { layer.forward(x); }),
            "moekit::MoELayer::forward: x[2,1] is nan; expected finite values "
            "(LayerConfig::check_finite = false skips this check)");
  x(2, 1) = 0;
  layer.forward(x);
  Matrix<double> dy = Matrix<double>::Zero(3, 4);
  dy(0, 3) = INFINITY;
  EXPECT_NE(message_of([&] { layer.backward(dy); }).find("dy[0,3] is inf"), std::string::npos);

  // The check runs over blocks of rows in parallel: one bad value deep in a large batch, of
  // either sign, is found.
  for (const double bad : {-INFINITY, INFINITY, NAN}) {
    Matrix<double> big = Matrix<double>::Random(1000, 4);
    big(777, 2) = bad;
    EXPECT_NE(message_of([&] { layer.forward(big); }).find("x[777,2] is"), std::string::npos) << bad;
  }

  Layer unchecked({.hidden = 4, .ffn = 4, .experts = 4, .check_finite = false});
  x(0, 0) = NAN;
  EXPECT_NO_THROW(unchecked.forward(x));
}

TEST(Errors, BackwardNeedsAMatchingForward) {
  Layer layer({.hidden = 4, .ffn = 4, .experts = 4});
  const std::string no_forward =
      "moekit::MoELayer::backward: no forward to go back through (backward consumes the last "
      "forward's saved activations); expected a call of forward(x) first";
  EXPECT_EQ(message_of([&] { layer.backward(Matrix<double>::Zero(2, 4)); }), no_forward);
  layer.forward(Matrix<double>::Zero(3, 4));
  EXPECT_EQ(message_of([&] { layer.backward(Matrix<double>::Zero(2, 4)); }),
            "moekit::MoELayer::backward: dy is [2,4]; expected [3,4] (tokens × hidden)");
  layer.backward(Matrix<double>::Zero(3, 4));  // a failed backward left the forward usable
  EXPECT_EQ(message_of([&] { layer.backward(Matrix<double>::Zero(3, 4)); }), no_forward)
      << "a second backward would read gradients as activations";
}

TEST(Errors, UnknownParameterNameListsTheKnownOnes) {
  Layer layer({.hidden = 4, .ffn = 4, .experts = 4});
  EXPECT_EQ(message_of([&] { layer.parameter("experts.w1"); }),
            "moekit::MoELayer: no parameter named 'experts.w1'; expected one of router.weight, "
            "experts.gate, experts.up, experts.down");
}

TEST(Errors, MismatchedFileLeavesTheLayerAsItWas) {
  const auto path = std::filesystem::temp_directory_path() / "moekit_errors_small.safetensors";
  Layer small({.hidden = 4, .ffn = 4, .experts = 4});
  small.save(path);
  Layer wide({.hidden = 6, .ffn = 4, .experts = 4});
  const std::vector<double> before(wide.parameters()[0].values().begin(), wide.parameters()[0].values().end());
  EXPECT_EQ(message_of([&] { wide.load(path); }),
            "moekit::MoELayer::load: '" + path.string() +
                "' tensor 'router.weight' is [4,4]; expected [4,6]");
  EXPECT_TRUE(std::ranges::equal(before, wide.parameters()[0].values()));
  MoELayer<TopK<2>, GroupedGemmType<GeLU>, double> plain({.hidden = 4, .ffn = 4, .experts = 4});
  plain.save(path);
  EXPECT_EQ(message_of([&] { small.load(path); }),
            "moekit::MoELayer::load: '" + path.string() +
                "' has no tensor 'experts.gate'; expected one of shape [4,4,4]");
  std::filesystem::remove(path);
}

TEST(Errors, AFailedLoadChangesNothingEvenWhenOnlyTheBalancerStateIsWrong) {
  namespace fs = std::filesystem;
  const auto path = fs::temp_directory_path() / "moekit_errors_bias.safetensors";
  using Free = MoELayer<TopK<2>, AuxFree, double>;
  Free saved({.hidden = 4, .ffn = 4, .experts = 4, .seed = 1});
  io::SafeTensors file;  // every parameter right, "router.bias" of the wrong dtype
  for (const auto& p : saved.parameters()) file.add(p.name(), p.shape(), p.values());
  file.add<std::int64_t>("router.bias", {4}, std::vector<std::int64_t>{1, 2, 3, 4});
  file.write(path);
  Free layer({.hidden = 4, .ffn = 4, .experts = 4, .seed = 2});
  const std::vector<double> before(layer.parameters()[1].values().begin(), layer.parameters()[1].values().end());
  EXPECT_EQ(message_of([&] { layer.load(path); }),
            "moekit::MoELayer::load: '" + path.string() + "' tensor 'router.bias' is I64; expected F32 or F64");
  EXPECT_TRUE(std::ranges::equal(before, layer.parameters()[1].values())) << "parameters changed by a failed load";
  fs::remove(path);
}

TEST(Errors, SizesWhoseProductOverflowsAreRefused) {
  EXPECT_EQ(message_of([] { Layer({.hidden = Index{1} << 32, .ffn = Index{1} << 32, .experts = 4}); }),
            "moekit::MoELayer: experts × ffn × hidden = 4 × 4294967296 × 4294967296 overflows; expected "
            "a product below 2^62");
}

// Options changed after construction are checked at the next forward, with the constructor's
// messages, before anything runs: none hangs, none gives a NaN or negative weight.
TEST(Errors, OptionsChangedAfterConstructionAreCheckedAtTheNextForward) {
  const Matrix<double> x = Matrix<double>::Ones(3, 4);
  MoELayer<TopK<2>, Capacity, double> layer({.hidden = 4, .ffn = 4, .experts = 4});
  layer.expert().options.row_tile = 0;
  EXPECT_EQ(message_of([&] { layer.forward(x); }),
            "moekit::GroupedGemm: row_tile = 0, column_tile = 256; expected both >= 1");
  layer.expert().options.row_tile = 256;
  layer.router().options.scale = -1;
  EXPECT_EQ(message_of([&] { layer.forward(x); }), "moekit::TopK: scale = -1; expected a finite number > 0");
  layer.router().options.scale = 1;
  layer.balancer().options.coefficient = std::nan("");
  EXPECT_NE(message_of([&] { layer.forward(x); }).find("moekit::AuxLoss: coefficient = nan"), std::string::npos);
  layer.balancer().options.coefficient = 0.01;
  layer.dispatcher().options.capacity_factor = -3;
  EXPECT_NE(message_of([&] { layer.forward(x); }).find("moekit::Capacity: capacity_factor = -3"), std::string::npos);
  layer.dispatcher().options.capacity_factor = 1;
  EXPECT_NO_THROW(layer.forward(x));
}

}  // namespace
}  // namespace moekit::test
