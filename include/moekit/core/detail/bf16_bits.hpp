#pragma once
// bfloat16 values as 16 bits: the products' bf16 operands and safetensors' BF16 tensors round the
// same way.
#include <bit>
#include <cstdint>

namespace moekit::detail {

/// x rounded to the nearest bf16, ties to even: the high 16 bits of a float (a NaN stays a
/// NaN). Without branches, so that loops of it run in vectors.
inline std::uint16_t to_bf16(float x) {
  const auto bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, quiet = (bits >> 16) | 0x40u;
  return static_cast<std::uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/// The float a bf16 value stands for (exactly).
inline float from_bf16(std::uint16_t x) { return std::bit_cast<float>(std::uint32_t{x} << 16); }

/// x as the bf16 operand the products see, in float.
inline float round_to_bf16(float x) { return from_bf16(to_bf16(x)); }

}  // namespace moekit::detail
