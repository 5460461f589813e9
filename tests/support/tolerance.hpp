#pragma once
#include <moekit/core/tensor.hpp>

namespace moekit::test {

/// How close two computations of the same thing must be, relative to the reference's largest
/// magnitude: a few hundred ulps of work in each scalar type.
template <Scalar T>
constexpr double tolerance = std::same_as<T, float> ? 2e-5 : 1e-12;

}  // namespace moekit::test
