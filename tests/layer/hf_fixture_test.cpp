// Hugging Face transformers' MoE blocks of Mixtral, Qwen2-MoE and DeepSeek-V3, reproduced:
// outputs, input gradient, every parameter gradient the fixture has, and the routing itself
// (tests/fixtures/hf).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

namespace moekit::test {
namespace {

const std::filesystem::path fixtures = MOEKIT_FIXTURES_DIR;

/// The fixture's block as `Layer` reproduces y, dx, every gradient the fixture has and the
/// routing (matched by expert: transformers' top-k need not be sorted) within `limit`.
template <class Layer>
void expect_reproduces(const std::string& name, double limit) {
  using T = typename Layer::scalar_type;
  constexpr int k = Layer::top_k;
  const auto path = fixtures / name;
  const auto file = io::SafeTensors::read(path);
  const auto block = io::HfBlock::from(file);
  ASSERT_TRUE(block.unsupported().empty());
  ASSERT_EQ(block.top_k, k);
  Layer layer(block.config(), block.router<k>());
  block.load(layer, file, path);

  const Matrix<T> y = layer.forward(block.activations<T>(file, "x"));
  const auto routing = io::routing_difference(layer.routing(), file);
  const Matrix<T> dx = layer.backward(block.activations<T>(file, "dy"));

  EXPECT_LT(io::relative_error(std::span<const T>(y.data(), y.size()), file.values<double>("y")), limit);
  EXPECT_LT(io::relative_error(std::span<const T>(dx.data(), dx.size()), file.values<double>("dx")), limit);
  int compared = 0;
  for (const auto& g : layer.gradients())
    if (const auto grad = "grad." + io::HfBlock::tensor_name(g.name()); file.contains(grad)) {
      EXPECT_LT(io::relative_error(g.values(), file.values<double>(grad)), limit) << g.name();
      ++compared;
    }
  EXPECT_EQ(compared, 4);  // the router's and the routed experts' three: the fixtures' gradients
  EXPECT_EQ(routing.mismatches, 0);
  EXPECT_LT(routing.weight_error, limit);
}

TEST(HfFixture, MixtralInDoubleWithin1e6) {
  expect_reproduces<MoELayer<TopK<2>, NoBalance, Dropless, GroupedGemm, double>>("mixtral.safetensors", 1e-6);
}

TEST(HfFixture, MixtralWithTheReferenceExpertsWithin1e6) {
  expect_reproduces<MoELayer<TopK<2>, NoBalance, Dropless, PerExpertLoop, double>>("mixtral.safetensors", 1e-6);
}

TEST(HfFixture, MixtralInFloatWithin1e4) {
  expect_reproduces<MoELayer<TopK<2>, NoBalance, Dropless, GroupedGemm, float>>("mixtral.safetensors", 1e-4);
}

// Qwen2-MoE: softmax top-4 of 60 in the model (here 2 of 6) without renormalising, plus a shared
// expert scaled per token by σ(x · shared_expert_gate).
TEST(HfFixture, Qwen2MoeWithItsGatedSharedExpertWithin1e6) {
  expect_reproduces<MoELayer<TopK<2>, NoBalance, Shared<SharedGate::sigmoid>, double>>("qwen2_moe.safetensors", 1e-6);
}

TEST(HfFixture, Qwen2MoeInFloatWithin1e4) {
  expect_reproduces<MoELayer<TopK<2>, NoBalance, Shared<SharedGate::sigmoid>, float>>("qwen2_moe.safetensors", 1e-4);
}

// DeepSeek-V3: sigmoid scores, the selection biased by router.bias (AuxFree's state), 4 groups
// scored by their top-2 sum, 2 kept, top-4 inside them, weights from the unbiased scores,
// normalised, × 2.5; plus an unscaled shared expert.
TEST(HfFixture, DeepSeekV3WithGroupsAndSharedExpertWithin1e6) {
  expect_reproduces<MoELayer<TopK<4>, AuxFree, Shared<>, double>>("deepseek_v3.safetensors", 1e-6);
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

TEST(HfFixture, ReadsEachFamilysConventions) {
  const auto qwen = io::HfBlock::from(io::SafeTensors::read(fixtures / "qwen2_moe.safetensors"));
  EXPECT_TRUE(qwen.unsupported().empty());
  EXPECT_TRUE(qwen.has_shared());
  EXPECT_EQ(qwen.shared_gate(), SharedGate::sigmoid);
  EXPECT_EQ(qwen.shared_ffn, 56);
  const auto deepseek = io::HfBlock::from(io::SafeTensors::read(fixtures / "deepseek_v3.safetensors"));
  EXPECT_TRUE(deepseek.unsupported().empty());
  EXPECT_EQ(deepseek.shared_gate(), SharedGate::none);
  EXPECT_EQ(deepseek.shared_ffn, 40);
  EXPECT_TRUE(deepseek.selection_bias);  // AuxFree's router.bias
  EXPECT_EQ(deepseek.score, ScoreFn::sigmoid);
  EXPECT_DOUBLE_EQ(deepseek.scale, 2.5);
  EXPECT_EQ(deepseek.groups, 4);
  EXPECT_EQ(deepseek.groups_kept, 2);
  const auto mixtral = io::HfBlock::from(io::SafeTensors::read(fixtures / "mixtral.safetensors"));
  EXPECT_FALSE(mixtral.has_shared());
}

TEST(HfFixture, NamesEveryConventionItDoesNotImplementByKeyAndValue) {
  auto file = io::SafeTensors::read(fixtures / "deepseek_v3.safetensors");
  file.metadata()["group_score"] = "mean score in group";
  file.metadata()["shared_expert"] = "gelu, unscaled";
  file.metadata()["layout_from"] = "gu_interleaved";
  file.metadata()["router_bias"] = "added to the logits";
  EXPECT_EQ(io::HfBlock::from(file).unsupported(),
            (std::vector<std::string>{"shared_expert = 'gelu, unscaled' (a shared expert of another form)",
                                      "group_score = 'mean score in group' (a group score of another form)",
                                      "layout_from = 'gu_interleaved' (an expert layout of another form)",
                                      "router_bias = 'added to the logits' (a convention moekit does not know)"}));
}

}  // namespace
}  // namespace moekit::test
