// The counter-based draws (core/random.hpp): a pure function of the counter, uniform on [0, 1),
// unrelated across neighbouring counters, jitter inside its interval and normal draws normal.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <set>

#include <moekit/core/random.hpp>

namespace moekit {
namespace {

TEST(Random, TheSameCounterGivesTheSameBitsAndEveryFieldMatters) {
  const RandomCounter c{.seed = 7, .step = 3, .token = 1000, .lane = 5};
  EXPECT_EQ(random_bits(c), random_bits(c));
  std::set<std::uint64_t> words{random_bits(c)};
  words.insert(random_bits({8, 3, 1000, 5}));
  words.insert(random_bits({7, 4, 1000, 5}));
  words.insert(random_bits({7, 3, 1001, 5}));
  words.insert(random_bits({7, 3, 1000, 6}));
  words.insert(random_bits({7, 3, 5, 1000}));  // token and lane are not interchangeable
  words.insert(random_bits({7, 3, 1000, 5, RandomStream::second_expert}));
  EXPECT_EQ(words.size(), 7u);
  static_assert(random_bits({1, 2, 3, 4}) == random_bits({1, 2, 3, 4}), "a constant expression");
  // A token's lanes from its shared bits, as the layer's loops draw them, are the same draws.
  for (Index lane = 0; lane < 100; ++lane)
    EXPECT_EQ(lane_bits(token_bits(c), lane), random_bits({c.seed, c.step, c.token, lane, c.stream}));
}

// 2^18 draws over tokens × lanes: the mean and variance of U[0, 1) within five standard errors,
// and 64 equal bins within a chi-square bound that a uniform source exceeds with probability 2e-6.
TEST(Random, UniformDrawsHaveUniformStatistics) {
  constexpr int tokens = 4096, lanes = 64, bins = 64;
  constexpr double n = double(tokens) * lanes;
  double sum = 0, sum_squares = 0;
  std::array<double, bins> count{};
  for (Index t = 0; t < tokens; ++t)
    for (Index h = 0; h < lanes; ++h) {
      const double u = random_uniform({.seed = 1, .step = 0, .token = t, .lane = h});
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      sum += u;
      sum_squares += u * u;
      ++count[static_cast<std::size_t>(u * bins)];
    }
  const double mean = sum / n, variance = sum_squares / n - mean * mean;
  EXPECT_NEAR(mean, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(variance, 1.0 / 12, 5 * std::sqrt(1.0 / 180 / n));  // Var(s²) ≈ (μ₄ − σ⁴)/n = 1/(180n)
  double chi_square = 0;
  for (double c : count) chi_square += (c - n / bins) * (c - n / bins) / (n / bins);
  EXPECT_LT(chi_square, 128.8) << "63 degrees of freedom; P(χ² > 128.8) = 2e-6";
}

// Neighbouring counters (the next lane, token, step, seed; the other stream) are uncorrelated: |r| below five standard
// errors of a correlation over n pairs (1/√n).
TEST(Random, NeighbouringCountersAreUncorrelated) {
  constexpr int n = 1 << 16;
  for (const RandomCounter step : {RandomCounter{0, 0, 0, 1}, RandomCounter{0, 0, 1, 0}, RandomCounter{0, 1, 0, 0},
                                   RandomCounter{1, 0, 0, 0}, RandomCounter{0, 0, 0, 0, RandomStream::second_expert}}) {
    double sxy = 0, sx = 0, sy = 0, sxx = 0, syy = 0;
    for (Index i = 0; i < n; ++i) {
      const RandomCounter a{.seed = 3, .step = 9, .token = i, .lane = 17};
      const RandomCounter b{a.seed + step.seed, a.step + step.step, a.token + step.token, a.lane + step.lane, step.stream};
      const double x = random_uniform(a), y = random_uniform(b);
      sx += x, sy += y, sxy += x * y, sxx += x * x, syy += y * y;
    }
    const double r = (sxy / n - sx / n * sy / n) /
                     std::sqrt((sxx / n - sx / n * sx / n) * (syy / n - sy / n * sy / n));
    EXPECT_LT(std::abs(r), 5 / std::sqrt(double(n)))
        << "counters one apart in seed, step, token, lane, stream: " << step.seed << step.step << step.token << step.lane
        << static_cast<int>(step.stream);
  }
}

TEST(Random, JitterStaysInItsIntervalAndCoversIt) {
  double low = 2, high = 0;
  for (Index t = 0; t < 20000; ++t) {
    const double f = jitter_factor({.seed = 2, .token = t}, 0.01);
    ASSERT_GE(f, 0.99);
    ASSERT_LT(f, 1.01);
    low = std::min(low, f), high = std::max(high, f);
  }
  EXPECT_LT(low, 0.9901);
  EXPECT_GT(high, 1.0099);
  EXPECT_EQ(jitter_factor({.token = 4}, 0.0), 1.0);
}

// Normal draws (noisy gating's): mean 0 and variance 1 within 5σ of their estimates over 2^18
// draws, and Φ of them uniform — 64 equal bins within the chi-square bound above — so the tails
// are right too; a draw's lane e is the pair of uniform lanes 2e and 2e + 1.
TEST(Random, NormalDrawsAreStandardNormal) {
  constexpr int tokens = 4096, lanes = 64, bins = 64;
  const double n = double(tokens) * lanes;
  double sum = 0, squares = 0, fourth = 0;
  std::array<double, bins> count{};
  for (Index t = 0; t < tokens; ++t) {
    const std::uint64_t token = token_bits({.seed = 5, .step = 1, .token = t, .stream = RandomStream::logit_noise});
    for (Index lane = 0; lane < lanes; ++lane) {
      const double z = normal_of_lane(token, lane);
      sum += z, squares += z * z, fourth += z * z * z * z;
      const double phi = 0.5 * std::erfc(-z / std::sqrt(2.0));
      ++count[std::min<std::size_t>(bins - 1, static_cast<std::size_t>(phi * bins))];
    }
  }
  EXPECT_NEAR(sum / n, 0.0, 5 / std::sqrt(n));
  EXPECT_NEAR(squares / n, 1.0, 5 * std::sqrt(2 / n));  // Var(z²) = 2
  EXPECT_NEAR(fourth / n, 3.0, 5 * std::sqrt(96 / n));  // E z⁴ = 3, Var(z⁴) = 105 − 9
  double chi_square = 0;
  for (double c : count) chi_square += (c - n / bins) * (c - n / bins) / (n / bins);
  EXPECT_LT(chi_square, 128.8) << "63 degrees of freedom; P(χ² > 128.8) = 2e-6";
  EXPECT_EQ(random_normal({.seed = 5, .token = 9, .lane = 3}),
            normal_of(random_uniform({.seed = 5, .token = 9, .lane = 6}), random_uniform({.seed = 5, .token = 9, .lane = 7})));
}

}  // namespace
}  // namespace moekit
