#pragma once
#include <cmath>
#include <span>
#include <vector>

#include <moekit/core/error.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit {

/// Adam, with decoupled weight decay when weight_decay > 0 (AdamW), over a layer's named
/// parameters and their gradients, matched by position.
template <Scalar T>
class Adam {
 public:
  struct Options {
    double learning_rate = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double epsilon = 1e-8;
    double weight_decay = 0.0;
  };

  explicit Adam(Options options = {}) : options_(options) {
    require(options.learning_rate > 0 && options.beta1 >= 0 && options.beta1 < 1 &&
                        options.beta2 >= 0 && options.beta2 < 1 && options.epsilon > 0 &&
                        options.weight_decay >= 0,
            "moekit::Adam: learning_rate = ", options.learning_rate, ", beta1 = ",
            options.beta1, ", beta2 = ", options.beta2, ", epsilon = ", options.epsilon,
            ", weight_decay = ", options.weight_decay,
            "; expected learning_rate > 0, betas in [0,1), epsilon > 0, weight_decay >= 0");
  }

  void step(std::span<Tensor<T>> parameters, std::span<const Tensor<T>> gradients) {
    require(parameters.size() == gradients.size(), "moekit::Adam::step: ",
            parameters.size(), " parameters but ", gradients.size(),
            " gradients; expected one gradient per parameter");
    if (first_.empty()) {
      for (const auto& p : parameters) {
        first_.emplace_back(static_cast<std::size_t>(p.size()), T(0));
        second_.emplace_back(static_cast<std::size_t>(p.size()), T(0));
      }
    }
    for (std::size_t i = 0; i < parameters.size(); ++i)  // all checked before any is changed
      require(i < first_.size() && parameters[i].values().size() == first_[i].size() &&
                  gradients[i].values().size() == first_[i].size(),
              "moekit::Adam::step: parameter '", parameters[i].name(), "' has ", parameters[i].values().size(),
              " values and its gradient ", gradients[i].values().size(), "; expected ",
              i < first_.size() ? first_[i].size() : 0, " for both, as on the first step");
    require(parameters.size() == first_.size(), "moekit::Adam::step: ", parameters.size(),
            " parameters; expected ", first_.size(), " as on the first step");
    ++steps_;
    const double lr = options_.learning_rate;
    const double correction1 = 1 - std::pow(options_.beta1, steps_);
    const double correction2 = 1 - std::pow(options_.beta2, steps_);
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      auto p = parameters[i].values();
      auto g = gradients[i].values();
      for (std::size_t j = 0; j < p.size(); ++j) {
        T& m = first_[i][j];
        T& v = second_[i][j];
        m = T(options_.beta1) * m + T(1 - options_.beta1) * g[j];
        v = T(options_.beta2) * v + T(1 - options_.beta2) * g[j] * g[j];
        const T update = T(m / correction1) / (std::sqrt(T(v / correction2)) + T(options_.epsilon));
        p[j] -= T(lr) * (update + T(options_.weight_decay) * p[j]);
      }
    }
  }

  int steps() const { return steps_; }

 private:
  Options options_;
  int steps_ = 0;
  std::vector<std::vector<T>> first_, second_;
};

}  // namespace moekit
