// Routing statistics after every forward, and the JSON-lines logger a training loop attaches.
#include <gtest/gtest.h>

#include <numeric>
#include <sstream>

#include <moekit/moekit.hpp>

namespace moekit::test {
namespace {

TEST(RoutingStats, MaxOverMeanByHand) {
  Plan plan;
  plan.reset(2, 4, 2);
  const std::vector<Index> load{3, 1, 0, 0};
  const auto s = RoutingStats::from(plan, load);
  EXPECT_DOUBLE_EQ(s.max_over_mean, 3.0);  // mean load 1, largest 3
  EXPECT_EQ(s.choices, 4);
}

TEST(RoutingStats, CountKeptTokensNotPaddingAndCarryTheBalancerTerm) {
  MoELayer<TopK<2>, AuxLoss, Capacity, double> layer({.hidden = 6, .ffn = 5, .experts = 4},
                                                     Capacity{{.capacity_factor = 1.0, .pad = true}});
  const Matrix<double> x = Matrix<double>::Random(10, 6);
  layer.forward(x);
  const auto s = layer.stats();
  EXPECT_EQ(s.tokens, 10);
  EXPECT_EQ(s.choices, 20);
  EXPECT_GT(s.dropped, 0);
  const Index kept = std::accumulate(s.tokens_per_expert.begin(), s.tokens_per_expert.end(), Index{0});
  EXPECT_EQ(kept, s.choices - s.dropped);
  EXPECT_GT(layer.plan().rows(), kept);  // padding rows exist, and are not counted
  EXPECT_TRUE(std::ranges::equal(layer.tokens_per_expert(), s.tokens_per_expert));
  ASSERT_EQ(s.balance_terms.size(), 1u);
  EXPECT_EQ(s.balance_terms[0].first, "AuxLoss");
  EXPECT_EQ(s.balance_terms[0].second, layer.balance_loss());
  EXPECT_GE(s.max_over_mean, 1.0);
}

TEST(JsonLinesLogger, WritesOneObjectPerForward) {
  MoELayer<TopK<2>, double> layer({.hidden = 6, .ffn = 5, .experts = 4});
  std::ostringstream out;
  JsonLinesLogger logger(out);
  layer.observe(std::ref(logger));
  layer.forward(Matrix<double>::Random(8, 6));
  layer.forward(Matrix<double>::Random(3, 6));
  layer.observe({});
  layer.forward(Matrix<double>::Random(3, 6));  // detached: no third line
  EXPECT_EQ(logger.steps(), 2);

  std::istringstream lines(out.str());
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    ++n;
    const auto json = io::detail::JsonParser(line, "log").parse();  // each line is valid JSON
    ASSERT_EQ(json.kind, io::detail::Json::Kind::object);
    std::vector<std::string> keys;
    for (const auto& [k, v] : json.members) keys.push_back(k);
    EXPECT_EQ(keys, (std::vector<std::string>{"step", "tokens", "choices", "dropped", "max_over_mean",
                                              "tokens_per_expert", "AuxLoss"}));
    EXPECT_EQ(json.members[0].second.text, std::to_string(n));
    EXPECT_EQ(json.members[1].second.text, n == 1 ? "8" : "3");
    EXPECT_EQ(json.members[5].second.items.size(), 4u);
  }
  EXPECT_EQ(n, 2);
}

}  // namespace
}  // namespace moekit::test
