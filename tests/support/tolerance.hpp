#pragma once
#include <moekit/core/tensor.hpp>

namespace moekit::test {

/// How close two computations of the same thing must be, relative to the reference's largest
/// magnitude: a few hundred ulps of work in each scalar type.
template <Scalar T>
constexpr double tolerance = std::same_as<T, float> ? 2e-5 : 1e-12;

/// A bf16 operand's relative rounding error, at most: bf16's unit roundoff, 2^-8 (8 significant bits).
inline constexpr double bf16_unit = 0x1p-8;

/// The bound an int8 layer keeps against exact products: ‖y_int8 − y‖ / ‖y‖ under 3%
/// (docs/concepts.md#int8; measured 1.5–2% on the float layers it is converted from).
inline constexpr double int8_bound = 0.03;

/// The same for a layer, whose experts' products may round their operands to bf16. Each product
/// then errs by about 0.65 u relative, root mean square (u = bf16_unit; two operands, each off by
/// at most u, about 0.46 u on average over a binade), and an output or gradient passes through at
/// most three products in turn: about 1.1 u. The layer tests' layers are 6 wide, so few roundings
/// average out: their gradients erred by up to 2.4 u. 4 u; the products themselves are held to
/// their rounding bound element by element in tests/core/bf16_test.cpp.
template <class Layer>
constexpr double layer_tolerance = [] {
  if (precision_of<typename Layer::expert_type> == Precision::bf16) return 4 * bf16_unit;
  if (precision_of<typename Layer::expert_type> == Precision::int8) return int8_bound;
  return tolerance<typename Layer::scalar_type>;
}();

}  // namespace moekit::test
