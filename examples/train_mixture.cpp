// Trains an MoE layer on a task only a mixture can fit: each token comes from one of several
// clusters, and its target is computed by that cluster's own hidden SwiGLU network. A router
// that learns to send each cluster to its own expert makes the task easy; no single expert can.
//
//   train_mixture [--steps N] [--seed S]
//
// Exits non-zero unless the loss falls at least 10× and every cluster is served mostly by one
// expert of its own.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <moekit/moekit.hpp>

namespace {

constexpr moekit::Index hidden = 16, ffn = 32, experts = 4, clusters = 4, batch = 256;
using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless,
                               moekit::GroupedGemm, float>;
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

std::string bar(int done, int total, int width = 24) {
  const auto filled = static_cast<std::size_t>(width * done / total);
  std::string s(static_cast<std::size_t>(width) + 2, '.');
  s.front() = '[';
  s.back() = ']';
  s.replace(1, filled, filled, '#');
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 600;
  unsigned seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--steps") steps = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--seed") seed = static_cast<unsigned>(std::atoi(argv[i + 1]));
    else {
      std::fprintf(stderr, "usage: train_mixture [--steps N] [--seed S]\n");
      return 2;
    }
  }

  Task task(seed);
  Layer layer({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed});
  moekit::Adam<float> adam({.learning_rate = 3e-3});
  Matrix x(batch, hidden), target(batch, hidden), y(batch, hidden), dy(batch, hidden), dx(batch, hidden);
  std::vector<int> cluster(batch);

  std::printf("train_mixture: %ld clusters, each with its own hidden SwiGLU map; layer %s\n",
              static_cast<long>(clusters), Layer::name().c_str());
  std::printf("H=%ld F=%ld E=%ld K=2, %ld tokens a step, Adam lr 3e-3\n\n", static_cast<long>(hidden),
              static_cast<long>(ffn), static_cast<long>(experts), static_cast<long>(batch));

  double first_loss = 0, recent = 0;
  const int report_every = std::max(1, steps / 12);
  for (int step = 1; step <= steps; ++step) {
    task.sample(x, target, cluster);
    layer.forward(x, y);
    // Mean squared error over every value; its gradient is dy.
    dy = (y - target) * (2.0f / static_cast<float>(y.size()));
    const double loss = (y - target).squaredNorm() / static_cast<double>(y.size());
    if (step == 1) first_loss = loss;
    recent = step == 1 ? loss : 0.9 * recent + 0.1 * loss;
    layer.zero_grad();
    layer.backward(dy, dx);
    adam.step(layer.parameters(), layer.gradients());

    if (step % report_every == 0 || step == 1 || step == steps) {
      std::printf("%s step %4d/%d  loss %.5f (÷%6.1f)  aux %.4f  tokens/expert", bar(step, steps).c_str(),
                  step, steps, recent, first_loss / recent, static_cast<double>(layer.balance_loss()));
      for (auto n : layer.tokens_per_expert()) std::printf(" %4ld", static_cast<long>(n));
      std::printf("\n");
      std::fflush(stdout);
    }
  }

  // Which expert is each cluster's first choice, and how often?
  std::vector<std::vector<int>> first_choice(clusters, std::vector<int>(experts, 0));
  task.sample(x, target, cluster);
  layer.forward(x, y);
  const double final_loss = (y - target).squaredNorm() / static_cast<double>(y.size());
  for (moekit::Index t = 0; t < batch; ++t)
    ++first_choice[static_cast<std::size_t>(cluster[static_cast<std::size_t>(t)])]
                  [static_cast<std::size_t>(layer.routing().index[static_cast<std::size_t>(2 * t)])];
  std::printf("\nfirst-choice expert per cluster (share of the cluster's tokens):\n");
  double worst_purity = 1;
  std::vector<int> owner(clusters);
  for (moekit::Index c = 0; c < clusters; ++c) {
    const auto& row = first_choice[static_cast<std::size_t>(c)];
    const auto best = std::max_element(row.begin(), row.end());
    const int total = std::max(1, std::accumulate(row.begin(), row.end(), 0));
    const double purity = double(*best) / total;
    owner[static_cast<std::size_t>(c)] = static_cast<int>(best - row.begin());
    worst_purity = std::min(worst_purity, purity);
    std::printf("  cluster %ld → expert %d  %5.1f%%\n", static_cast<long>(c), owner[static_cast<std::size_t>(c)], 100 * purity);
  }
  std::sort(owner.begin(), owner.end());
  const bool distinct = std::unique(owner.begin(), owner.end()) == owner.end();
  const double ratio = first_loss / final_loss;
  std::printf("\nloss %.5f → %.5f (÷%.1f); experts %s\n", first_loss, final_loss, ratio,
              distinct && worst_purity >= 0.9 ? "specialised: each cluster has its own" : "NOT specialised");
  const bool ok = ratio >= 10 && distinct && worst_purity >= 0.9;
  if (!ok) std::printf("train_mixture: FAILED (expected loss down ≥10× and one expert per cluster, ≥90%%)\n");
  return ok ? 0 : 1;
}
