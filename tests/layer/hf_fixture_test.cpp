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

TEST(HfFixture, OtherFamiliesNameWhatIsMissingByKeyAndValue) {
  const auto qwen = io::HfBlock::from(io::SafeTensors::read(fixtures / "qwen2_moe.safetensors"));
  ASSERT_EQ(qwen.unsupported().size(), 1u);
  EXPECT_EQ(qwen.unsupported()[0],
            "shared_expert = 'swiglu, scaled by sigmoid(x . shared.gate_proj_weight)' (a shared expert)");
  const auto deepseek = io::HfBlock::from(io::SafeTensors::read(fixtures / "deepseek_v3.safetensors"));
  ASSERT_EQ(deepseek.unsupported().size(), 1u);  // the shared expert; its group-limited top-k is supported
  EXPECT_EQ(deepseek.unsupported()[0], "shared_expert = 'swiglu, unscaled' (a shared expert)");
  EXPECT_TRUE(deepseek.selection_bias);  // supported: AuxFree's router.bias
  EXPECT_EQ(deepseek.score, ScoreFn::sigmoid);
  EXPECT_DOUBLE_EQ(deepseek.scale, 2.5);
  io::HfBlock odd = deepseek;
  odd.group_score = "mean score in group";
  EXPECT_EQ(odd.unsupported().back(), "group_score = 'mean score in group'");
}

// DeepSeek-V3's routing, as transformers computes it: sigmoid scores, the selection biased by
// router.bias (AuxFree's state), 4 groups scored by their top-2 sum, 2 kept, top-4 inside them,
// weights from the unbiased scores, normalised, × 2.5. The block's output also has a shared
// expert, so the routing is what is compared here.
TEST(HfFixture, DeepSeekV3RoutingReproduced) {
  const auto path = fixtures / "deepseek_v3.safetensors";
  const auto file = io::SafeTensors::read(path);
  const auto block = io::HfBlock::from(file);
  ASSERT_EQ(block.top_k, 4);
  ASSERT_EQ(block.groups, 4);
  ASSERT_EQ(block.groups_kept, 2);
  MoELayer<TopK<4>, AuxFree, double> layer(
      {.hidden = block.hidden, .ffn = block.ffn, .experts = block.experts},
      TopK<4>{{.score = block.score, .normalize = block.normalize, .scale = block.scale, .groups = block.groups,
               .groups_kept = block.groups_kept, .group_score = block.group_rule()}});
  layer.load(path);
  layer.forward(block.activations<double>(file, "x"));
  const auto index = file.integers("topk.index");
  const auto weight = file.values<double>("topk.weight");
  const auto& routing = layer.routing();
  ASSERT_EQ(index.size(), routing.index.size());
  for (Index t = 0; t < block.tokens; ++t)  // transformers' top-k is unsorted: match by expert
    for (int k = 0; k < 4; ++k) {
      const auto c = static_cast<std::size_t>(t * 4 + k);
      bool found = false;
      for (int j = 0; j < 4; ++j) {
        const auto d = static_cast<std::size_t>(t * 4 + j);
        if (routing.index[d] != index[c]) continue;
        found = true;
        EXPECT_NEAR(routing.weight[d], weight[c], 1e-6 * 2.5) << "token " << t << ", expert " << index[c];
      }
      EXPECT_TRUE(found) << "token " << t << ": expert " << index[c] << " not chosen";
    }
}

}  // namespace
}  // namespace moekit::test
