#pragma once
// Test inputs: matrices of normal draws, the same for a seed on every machine and scalar type.
#include <random>

#include <moekit/core/tensor.hpp>

namespace moekit::test {

/// rows × cols of N(mean, stddev²) draws from mt19937(seed), in storage order, rounded to T.
template <Scalar T = double>
Matrix<T> random_matrix(Index rows, Index cols, unsigned seed, double stddev = 1.0, double mean = 0.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> draw(mean, stddev);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(draw(rng));
  return m;
}

}  // namespace moekit::test
