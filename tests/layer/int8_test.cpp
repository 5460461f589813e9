// int8 experts (MoELayer<…, int8>, forward only) against the float layer they are converted from:
// the same routing, the output within the stated bound (docs/concepts.md#precision: 3% of the
// output's norm; measured figures are recorded as test properties), for routed and shared
// experts, GPT-OSS's biased experts and the Hugging Face fixtures loaded straight into an int8
// layer. An int8 layer's weights follow its parameters: each way of setting them quantises anew.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <type_traits>

#include <tbb/global_control.h>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

#include "../support/random.hpp"
#include "../support/tolerance.hpp"

namespace moekit {
namespace {

using test::int8_bound;

double relative(const Matrix<float>& got, const Matrix<float>& want) { return (got - want).norm() / want.norm(); }

template <class Float, class Int8>
void expect_within_bound(const LayerConfig& config, Index tokens, const std::string& what) {
  Float trained(config);
  Int8 served = convert_layer<Int8>(trained);
  const Matrix<float> x = test::random_matrix<float>(tokens, config.hidden, 1);
  const Matrix<float> y = trained.forward(x), y_int8 = served.forward(x);
  EXPECT_EQ(served.routing().index, trained.routing().index) << what;
  const double error = relative(y_int8, y);
  EXPECT_LT(error, int8_bound) << what;
  EXPECT_GT(error, 1e-4) << what << ": no quantisation seen";
  ::testing::Test::RecordProperty(what, std::to_string(error));
}

TEST(Int8Layer, ConvertedFromFloatWithinTheBound) {
  expect_within_bound<MoELayer<TopK<2>>, MoELayer<TopK<2>, int8>>({.hidden = 256, .ffn = 384, .experts = 8, .seed = 3},
                                                                  256, "routed");
}

TEST(Int8Layer, SharedExpertQuantisedToo) {
  using Int8 = MoELayer<TopK<2>, NoBalance, Shared<SharedGate::sigmoid>, int8>;
  static_assert(Int8::shared_expert_type::expert_type::precision == Precision::int8);
  expect_within_bound<MoELayer<TopK<2>, NoBalance, Shared<SharedGate::sigmoid>>, Int8>(
      {.hidden = 256, .ffn = 192, .experts = 8, .shared_ffn = 384, .seed = 4}, 256, "shared");
}

TEST(Int8Layer, BiasedExpertsAndAnFfnNotAPanelsMultiple) {  // GPT-OSS's experts; 200 = 12.5 panels
  using Experts = GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>;
  expect_within_bound<MoELayer<TopK<4>, NoBalance, Experts>, MoELayer<TopK<4>, NoBalance, Experts, int8>>(
      {.hidden = 96, .ffn = 200, .experts = 8, .seed = 5}, 100, "biased");
}

TEST(Int8Layer, ConvertsFromBf16) {
  expect_within_bound<MoELayer<TopK<2>, bf16>, MoELayer<TopK<2>, int8>>({.hidden = 128, .ffn = 256, .experts = 4, .seed = 6},
                                                                       64, "from bf16");
}

TEST(Int8Layer, FollowsItsParameters) {
  using Float = MoELayer<TopK<2>>;
  using Int8 = MoELayer<TopK<2>, int8>;
  static_assert(std::is_same_v<decltype(std::declval<Int8&>().parameters()), std::span<const Tensor<float>>>,
                "an int8 layer's parameters are read-only");
  const LayerConfig config{.hidden = 64, .ffn = 96, .experts = 4, .seed = 7};
  const Matrix<float> x = test::random_matrix<float>(32, 64, 8);
  Float a(config), b({.hidden = 64, .ffn = 96, .experts = 4, .seed = 9});
  Int8 served(config);
  const Matrix<float> y_a = a.forward(x), y_b = b.forward(x);
  EXPECT_LT(relative(served.forward(x), y_a), int8_bound) << "constructed from the same seed";
  served.assign_whole(b.parameters());
  EXPECT_LT(relative(served.forward(x), y_b), int8_bound) << "assign_whole";
  served.initialize(7);
  EXPECT_LT(relative(served.forward(x), y_a), int8_bound) << "initialize";
  const auto path = std::filesystem::temp_directory_path() / "moekit_int8_follows.safetensors";
  b.save(path);
  served.load(path);
  std::filesystem::remove(path);
  EXPECT_LT(relative(served.forward(x), y_b), int8_bound) << "load";
}

TEST(Int8Layer, SameBitsOnAnyThreadCount) {
  using Int8 = MoELayer<TopK<2>, int8>;
  Int8 served({.hidden = 128, .ffn = 320, .experts = 4, .seed = 10});
  served.expert().options = {.row_tile = 16, .column_tile = 40};  // many tiles; 40 is rounded to 48
  const Matrix<float> x = test::random_matrix<float>(200, 128, 11);
  Matrix<float> one;
  {
    tbb::global_control only(tbb::global_control::max_allowed_parallelism, 1);
    one = served.forward(x);
  }
  EXPECT_EQ(served.forward(x), one);
}

TEST(Int8Layer, NamedByItsPrecision) {
  EXPECT_EQ((MoELayer<TopK<2>, int8>::name()), "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_i8");
}

TEST(Int8Layer, AnExpertNotPreparedSaysSo) {
  GroupedGemmType<SwiGLU, ExpertBias::none, Precision::int8> expert;
  const LayerShape shape{.hidden = 8, .ffn = 16, .experts = 2, .top_k = 1};
  std::vector<Tensor<float>> weights;
  for (const auto& spec : decltype(expert)::parameters(shape, 2)) weights.emplace_back(spec.name, spec.shape);
  decltype(expert)::Saved<float> saved;
  Workspace<float> workspace;
  const Matrix<float> rows = Matrix<float>::Ones(4, 8);
  Matrix<float> out(4, 8);
  const Index offsets[3] = {0, 2, 4};
  try {
    expert.forward<float>(weights, rows, offsets, out, saved, workspace);
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_STREQ(e.what(), "moekit::GroupedGemm: int8 weights for 0 experts; expected 2 (call prepare(weights) when "
                           "the weights are set)");
  }
}

// The Hugging Face fixtures' blocks, loaded straight into int8 layers (HfBlock::with_layer<float,
// Precision::int8>), against the fixtures' float64 outputs.
TEST(Int8Layer, HuggingFaceFixturesLoadStraightIntoInt8) {
  for (const std::string name : {"mixtral", "qwen2_moe", "deepseek_v3"}) {
    const auto path = std::filesystem::path(MOEKIT_FIXTURES_DIR) / (name + ".safetensors");
    const auto file = io::SafeTensors::read(path);
    const auto block = io::HfBlock::from(file);
    const Matrix<float> x = block.activations<float>(file, "x"), y = block.activations<float>(file, "y");
    block.with_layer<float, Precision::int8>([&](auto& layer) {
      static_assert(std::remove_reference_t<decltype(layer)>::quantises_weights);
      block.load(layer, file, path);
      const double error = relative(layer.forward(x), y);
      EXPECT_LT(error, int8_bound) << name;
      ::testing::Test::RecordProperty(name, std::to_string(error));
    });
  }
}

}  // namespace
}  // namespace moekit
