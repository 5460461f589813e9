// Hugging Face transformers' MixtralSparseMoeBlock, reproduced: outputs, input gradient, every
// parameter gradient, and the routing itself (tests/fixtures/hf/mixtral.safetensors).
#include <gtest/gtest.h>

#include <filesystem>

#include <moekit/io/hf_fixture.hpp>
#include <moekit/moekit.hpp>

namespace moekit::test {
namespace {

const std::filesystem::path fixtures = MOEKIT_FIXTURES_DIR;

template <class Layer>
void expect_reproduces_mixtral(double limit) {
  using T = typename Layer::scalar_type;
  const auto file = io::SafeTensors::read(fixtures / "mixtral.safetensors");
  const auto block = io::HfBlock::from(file);
  ASSERT_TRUE(block.unsupported().empty());
  ASSERT_EQ(block.top_k, 2);
  Layer layer({.hidden = block.hidden, .ffn = block.ffn, .experts = block.experts},
              TopK<2>{{.score = block.score, .normalize = block.normalize, .scale = block.scale}});
  layer.load(fixtures / "mixtral.safetensors");

  const Matrix<T> y = layer.forward(block.activations<T>(file, "x"));
  const Matrix<T> dx = layer.backward(block.activations<T>(file, "dy"));

  EXPECT_LT(io::relative_error(std::span<const T>(y.data(), y.size()), file.values<double>("y")), limit);
  EXPECT_LT(io::relative_error(std::span<const T>(dx.data(), dx.size()), file.values<double>("dx")), limit);
  for (const auto& g : layer.gradients())
    EXPECT_LT(io::relative_error(g.values(), file.values<double>("grad." + g.name())), limit) << g.name();
  EXPECT_LT(io::relative_error(layer.routing().weight, file.values<double>("topk.weight")), limit);
  const auto index = file.integers("topk.index");
  ASSERT_EQ(index.size(), layer.routing().index.size());
  for (std::size_t i = 0; i < index.size(); ++i) EXPECT_EQ(layer.routing().index[i], index[i]) << i;
}

TEST(HfFixture, MixtralInDoubleWithin1e6) {
  expect_reproduces_mixtral<MoELayer<TopK<2>, NoBalance, Dropless, GroupedGemm, double>>(1e-6);
}

TEST(HfFixture, MixtralWithTheReferenceExpertsWithin1e6) {
  expect_reproduces_mixtral<MoELayer<TopK<2>, NoBalance, Dropless, PerExpertLoop, double>>(1e-6);
}

TEST(HfFixture, MixtralInFloatWithin1e4) {
  expect_reproduces_mixtral<MoELayer<TopK<2>, NoBalance, Dropless, GroupedGemm, float>>(1e-4);
}

TEST(HfFixture, ActivationsMustMatchTheMetadata) {
  auto file = io::SafeTensors::read(fixtures / "mixtral.safetensors");
  auto block = io::HfBlock::from(file);
  block.hidden = 31;
  try {
    block.activations<double>(file, "x");
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_STREQ(e.what(), "moekit::HfBlock: tensor 'x' is [24,32]; expected [24,31] from the metadata's tokens and hidden");
  }
}

TEST(HfFixture, OtherFamiliesNameWhatIsMissing) {
  const auto qwen = io::HfBlock::from(io::SafeTensors::read(fixtures / "qwen2_moe.safetensors"));
  ASSERT_EQ(qwen.unsupported().size(), 1u);
  EXPECT_NE(qwen.unsupported()[0].find("shared expert"), std::string::npos);
  const auto deepseek = io::HfBlock::from(io::SafeTensors::read(fixtures / "deepseek_v3.safetensors"));
  EXPECT_EQ(deepseek.unsupported().size(), 2u);  // shared expert, group-limited top-k
  EXPECT_TRUE(deepseek.selection_bias);           // supported: AuxFree's router.bias
  EXPECT_EQ(deepseek.score, ScoreFn::sigmoid);
  EXPECT_DOUBLE_EQ(deepseek.scale, 2.5);
}

}  // namespace
}  // namespace moekit::test
