#pragma once
// The task of train_mixture (in one process and over MPI ranks): each token comes from one of several
// clusters, and its target is computed by that cluster's own hidden SwiGLU network.
#include <random>
#include <utility>
#include <vector>

#include <moekit/moekit.hpp>

namespace mixture {

constexpr moekit::Index hidden = 16, ffn = 32, experts = 8, clusters = 8, batch = 256;
using Matrix = moekit::Matrix<float>;

/// The data: cluster centres, and one hidden SwiGLU network per cluster.
struct Task {
  Matrix centres{clusters, hidden};
  std::vector<Matrix> gate, up, down;  // [F,H], [F,H], [H,F] per cluster
  std::mt19937 rng;
  std::vector<double> frequency;  // of each cluster, relative; empty: all equally often

  explicit Task(unsigned seed, std::vector<double> cluster_frequency = {})
      : rng(seed), frequency(std::move(cluster_frequency)) {
    std::normal_distribution<float> normal;
    for (moekit::Index i = 0; i < centres.size(); ++i) centres.data()[i] = 2.0f * normal(rng);
    for (moekit::Index c = 0; c < clusters; ++c) {
      auto random = [&](moekit::Index rows, moekit::Index cols, float scale) {
        Matrix m(rows, cols);
        for (moekit::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * normal(rng);
        return m;
      };
      gate.push_back(random(ffn, hidden, 0.5f / 4));
      up.push_back(random(ffn, hidden, 0.5f / 4));
      down.push_back(random(hidden, ffn, 1.0f / 4));
    }
  }

  /// A batch of tokens, their targets and their clusters (as many as `cluster` holds).
  void sample(Matrix& x, Matrix& target, std::vector<int>& cluster) {
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> any(0, clusters - 1);
    std::discrete_distribution<int> weighted(frequency.begin(), frequency.end());
    for (moekit::Index t = 0; t < static_cast<moekit::Index>(cluster.size()); ++t) {
      const int c = cluster[static_cast<std::size_t>(t)] = frequency.empty() ? any(rng) : weighted(rng);
      for (moekit::Index h = 0; h < hidden; ++h) x(t, h) = centres(c, h) + 0.5f * normal(rng);
      const Eigen::VectorXf g = gate[static_cast<std::size_t>(c)] * x.row(t).transpose();
      const Eigen::VectorXf u = up[static_cast<std::size_t>(c)] * x.row(t).transpose();
      const Eigen::VectorXf a = g.unaryExpr([](float v) { return moekit::SwiGLU::apply(v); }).cwiseProduct(u);
      target.row(t) = (down[static_cast<std::size_t>(c)] * a).transpose();
    }
  }
};

}  // namespace mixture
