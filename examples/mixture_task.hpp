#pragma once
// The task of train_mixture (in one process and over MPI ranks): each token comes from one of several
// clusters, and its target is computed by that cluster's own hidden SwiGLU network.
#include <random>
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

  explicit Task(unsigned seed) : rng(seed) {
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

  /// A batch of tokens, their targets and their clusters.
  void sample(Matrix& x, Matrix& target, std::vector<int>& cluster) {
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> pick(0, clusters - 1);
    for (moekit::Index t = 0; t < batch; ++t) {
      const int c = cluster[static_cast<std::size_t>(t)] = pick(rng);
      for (moekit::Index h = 0; h < hidden; ++h) x(t, h) = centres(c, h) + 0.5f * normal(rng);
      const Eigen::VectorXf g = gate[static_cast<std::size_t>(c)] * x.row(t).transpose();
      const Eigen::VectorXf u = up[static_cast<std::size_t>(c)] * x.row(t).transpose();
      const Eigen::VectorXf a = g.unaryExpr([](float v) { return moekit::SwiGLU::apply(v); }).cwiseProduct(u);
      target.row(t) = (down[static_cast<std::size_t>(c)] * a).transpose();
    }
  }
};

}  // namespace mixture
