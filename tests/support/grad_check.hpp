#pragma once
// Central finite differences of the loss L = Σ(y ⊙ dy) + balance_loss against a layer's
// backward pass, for the input and every parameter (mlpack's Jacobian checks, in double).
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <moekit/core/tensor.hpp>

namespace moekit::test {

struct GradientReport {
  std::string name;
  double error = 0;  // max |analytic − numeric| over max(|numeric|, 1e-3)
};

/// Central differences of loss() in every entry of `values`, which loss() reads.
template <class Values, class Loss>
std::vector<double> numeric_gradient(Values& values, Loss loss, double h = 1e-6) {
  std::vector<double> numeric(static_cast<std::size_t>(values.size()));
  for (std::size_t i = 0; i < numeric.size(); ++i) {
    const double keep = values[i];
    values[i] = keep + h;
    const double up = loss();
    values[i] = keep - h;
    const double down = loss();
    values[i] = keep;
    numeric[i] = (up - down) / (2 * h);
  }
  return numeric;
}

template <class Layer>
double loss(Layer& layer, const Matrix<double>& x, const Matrix<double>& dy) {
  const Matrix<double> y = layer.forward(x);
  return (y.array() * dy.array()).sum() + layer.balance_loss();
}

template <class Values>
double compare(const std::vector<double>& analytic, const Values& numeric) {
  double diff = 0, scale = 1e-3;
  for (std::size_t i = 0; i < analytic.size(); ++i) {
    diff = std::max(diff, std::abs(analytic[i] - numeric[i]));
    scale = std::max(scale, std::abs(numeric[i]));
  }
  return diff / scale;
}

/// Checks dx and every parameter's gradient by central differences with step h.
template <class Layer>
std::vector<GradientReport> check_gradients(Layer& layer, Matrix<double> x,
                                            const Matrix<double>& dy, double h = 1e-6) {
  layer.zero_grad();
  layer.forward(x);
  const Matrix<double> dx = layer.backward(dy);
  std::vector<GradientReport> reports;

  std::span<double> x_values(x.data(), static_cast<std::size_t>(x.size()));
  auto numeric = numeric_gradient(x_values, [&] { return loss(layer, x, dy); }, h);
  reports.push_back({"x", compare(std::vector<double>(dx.data(), dx.data() + dx.size()), numeric)});

  for (std::size_t p = 0; p < layer.parameters().size(); ++p) {
    auto values = layer.parameters()[p].values();
    const auto grad = layer.gradients()[p].values();
    numeric = numeric_gradient(values, [&] { return loss(layer, x, dy); }, h);
    reports.push_back({layer.parameters()[p].name(),
                       compare(std::vector<double>(grad.begin(), grad.end()), numeric)});
  }
  return reports;
}

}  // namespace moekit::test
