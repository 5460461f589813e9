#pragma once
// Random numbers for the policies that draw them in training (a router's input jitter, GShard's
// random second expert, noisy gating's noise). Each number is a pure function of a counter, never the next value of a stream: a token draws the
// same numbers on any thread count and at any expert-parallel degree, whichever thread or rank
// computes it, and a step can be replayed. docs/concepts.md#random
#include <cmath>
#include <cstdint>
#include <numbers>

#include <moekit/core/tensor.hpp>

namespace moekit {

/// What a draw is for, so that two kinds of draw from one seed are unrelated.
enum class RandomStream : std::uint64_t { jitter = 0, second_expert = 1, logit_noise = 2 };

/// Where a number is drawn: the policy's seed, the layer's step (advanced by end_step()), the
/// token's number in the whole batch (its rank's first token plus its index), a lane within the
/// token (a column of x, an expert) and what the draw is for.
struct RandomCounter {
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
  Index token = 0;
  Index lane = 0;
  RandomStream stream = RandomStream::jitter;
};

namespace detail {

/// SplitMix64's finaliser: a bijection of 64-bit words whose every output bit depends on every
/// input bit (Steele, Lea and Flood, 2014).
constexpr std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace detail

/// The counter's fields but the lane, folded in and mixed in turn: what a token's draws share, so
/// a loop over many lanes mixes this once (lane_bits).
constexpr std::uint64_t token_bits(const RandomCounter& c) {
  std::uint64_t h = detail::mix64(c.seed + 0x9E3779B97F4A7C15ull);
  h = detail::mix64(h ^ static_cast<std::uint64_t>(c.stream));
  h = detail::mix64(h ^ c.step);
  return detail::mix64(h ^ static_cast<std::uint64_t>(c.token));
}

/// 64 random bits for one lane of a token: lane_bits(token_bits(c), c.lane) = random_bits(c).
constexpr std::uint64_t lane_bits(std::uint64_t token, Index lane) {
  return detail::mix64(token ^ static_cast<std::uint64_t>(lane));
}

/// 64 random bits for one counter: each field is folded in and mixed in turn, so counters that
/// differ in any field give unrelated words. Statistical quality, not cryptographic.
constexpr std::uint64_t random_bits(const RandomCounter& c) { return lane_bits(token_bits(c), c.lane); }

/// A uniform draw from [0, 1) with 53 of the bits.
constexpr double uniform_of(std::uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }
constexpr double random_uniform(const RandomCounter& c) { return uniform_of(random_bits(c)); }

/// Multiplicative jitter: a uniform draw u from [0, 1) made a draw from [1 − ε, 1 + ε) (Switch
/// Transformer's input jitter).
constexpr double jitter_of(double u, double epsilon) { return 1.0 + epsilon * (2.0 * u - 1.0); }
constexpr double jitter_factor(const RandomCounter& c, double epsilon) { return jitter_of(random_uniform(c), epsilon); }

/// A standard normal draw from two uniform ones (Box–Muller): √(−2 ln(1 − u₁)) · cos(2π u₂).
inline double normal_of(double u1, double u2) {
  return std::sqrt(-2.0 * std::log1p(-u1)) * std::cos(2.0 * std::numbers::pi * u2);
}
/// Lane e of a token's normal draws, from its lanes 2e and 2e + 1 of uniform ones.
inline double normal_of_lane(std::uint64_t token, Index lane) {
  return normal_of(uniform_of(lane_bits(token, 2 * lane)), uniform_of(lane_bits(token, 2 * lane + 1)));
}
inline double random_normal(const RandomCounter& c) { return normal_of_lane(token_bits(c), c.lane); }

}  // namespace moekit
