// Trains an MoE layer on a task only a mixture can fit: each token comes from one of several
// clusters, and its target is computed by that cluster's own hidden SwiGLU network. A router
// that learns to send each cluster to its own expert makes the task easy; no single expert can.
//
//   train_mixture [--steps N] [--seed S] [--balancer auxloss|sinkhorn|auxfree|none] [--precision f32|bf16|int8]
//   mpirun -np 4 train_mixture --expert-parallel [...]   (expert_parallel_run.hpp)
//
// Then trains one dense SwiGLU with the same compute per token on the same task, for comparison.
// Exits non-zero unless the loss falls at least 10×, every cluster puts ≥70% of its routing
// weight on two experts (25% when uniform), the clusters spread over at least half the experts, and the dense
// network ends at least 2× worse. With --precision bf16 the experts' products (the dense
// network's too) run on bf16 operands, and the same layer is trained once more in float from the
// same seed: the bf16 run must also end within 1.1× of its loss. With --precision int8 the layer
// trains in float and is then converted to int8 experts (convert_layer), as it would be served:
// on a fresh batch its output must stay within 3% of the float layer's and its loss within 1.1×.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <moekit/moekit.hpp>

#include "mixture_task.hpp"
#if MOEKIT_EXAMPLE_EXPERT_PARALLEL  // a build with moekit::distributed (MOEKIT_DISTRIBUTED=ON)
#include "expert_parallel_run.hpp"
#endif

namespace {

using namespace mixture;

using Float = moekit::ProductPrecision<moekit::Precision::scalar>;

template <class Balancer, class Precision = Float>
using Layer = moekit::MoELayer<moekit::TopK<2>, Balancer, moekit::Dropless, moekit::GroupedGemm, float, Precision>;
// The same compute per token without a mixture: one SwiGLU expert of width K·F.
template <class Precision = Float>
using Dense = moekit::MoELayer<moekit::TopK<1>, moekit::NoBalance, float, Precision>;

/// bf16 may cost the task this much loss against the float run: bf16 rounds each product's
/// operands by up to 2^-8, and the runs differ by a few percent at most (docs/performance.md#precision).
constexpr double bf16_loss_factor = 1.1;
/// int8 serving may cost this much: its output within 3% of the float layer's (norm-wise), as the
/// layer tests bound it (docs/concepts.md#precision), and its loss within 1.1× of float's.
constexpr double int8_output_bound = 0.03, int8_loss_factor = 1.1;

std::string bar(int done, int total, int width = 24) {
  const auto filled = static_cast<std::size_t>(width * done / total);
  std::string s(static_cast<std::size_t>(width) + 2, '.');
  s.front() = '[';
  s.back() = ']';
  s.replace(1, filled, filled, '#');
  return s;
}

/// Trains with Adam on fresh batches; returns the first batch's loss. With `report`, prints a
/// progress bar, the loss and the tokens each expert received.
template <class L>
double train(L& layer, Task& task, int steps, bool report) {
  moekit::Adam<float> adam({.learning_rate = 3e-3});
  Matrix x(batch, hidden), target(batch, hidden), y(batch, hidden), dy(batch, hidden), dx(batch, hidden);
  std::vector<int> cluster(batch);
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
    layer.end_step();  // AuxFree moves its bias here

    if (report && (step % report_every == 0 || step == 1 || step == steps)) {
      std::printf("%s step %4d/%d  loss %.5f (÷%6.1f)  max/mean load %.2f  tokens/expert",
                  bar(step, steps).c_str(), step, steps, recent, first_loss / recent,
                  layer.stats().max_over_mean);
      for (auto n : layer.tokens_per_expert()) std::printf(" %4ld", static_cast<long>(n));
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return first_loss;
}

/// Mean squared error on a fresh batch.
template <class L>
double evaluate(L& layer, Task& task, Matrix& x, Matrix& target, Matrix& y, std::vector<int>& cluster) {
  task.sample(x, target, cluster);
  layer.forward(x, y);
  return (y - target).squaredNorm() / static_cast<double>(y.size());
}

}  // namespace

template <class Balancer, class Precision = Float>
int run(int steps, unsigned seed) {
  constexpr bool serves_int8 = std::is_same_v<Precision, moekit::int8>;
  using Trained = std::conditional_t<serves_int8, Float, Precision>;  // int8 layers do not train
  using Layer = ::Layer<Balancer, Trained>;
  Task task(seed);
  Layer layer({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed});
  Matrix x(batch, hidden), target(batch, hidden), y(batch, hidden);
  std::vector<int> cluster(batch);

  std::printf("train_mixture: %ld clusters, each with its own hidden SwiGLU map; layer %s\n",
              static_cast<long>(clusters), Layer::name().c_str());
  std::printf("H=%ld F=%ld E=%ld K=2, %ld tokens a step, Adam lr 3e-3\n\n", static_cast<long>(hidden),
              static_cast<long>(ffn), static_cast<long>(experts), static_cast<long>(batch));
  const double first_loss = train(layer, task, steps, true);

  // How much of each cluster's routing weight goes to its K most-used experts?
  std::vector<std::vector<double>> weight(clusters, std::vector<double>(experts, 0.0));
  const double final_loss = evaluate(layer, task, x, target, y, cluster);
  for (moekit::Index t = 0; t < batch; ++t)
    for (int k = 0; k < 2; ++k) {
      const auto choice = static_cast<std::size_t>(2 * t + k);
      weight[static_cast<std::size_t>(cluster[static_cast<std::size_t>(t)])]
            [static_cast<std::size_t>(layer.routing().index[choice])] += layer.routing().weight[choice];
    }
  std::printf("\nrouting weight per cluster on its two most-used experts (uniform routing: %.0f%%):\n",
              200.0 / experts);
  double worst_share = 1;
  std::vector<int> lead(clusters);
  for (moekit::Index c = 0; c < clusters; ++c) {
    auto row = weight[static_cast<std::size_t>(c)];
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return row[static_cast<std::size_t>(a)] > row[static_cast<std::size_t>(b)]; });
    const double total = std::max(1e-30, std::accumulate(row.begin(), row.end(), 0.0));
    const double share = (row[static_cast<std::size_t>(order[0])] + row[static_cast<std::size_t>(order[1])]) / total;
    lead[static_cast<std::size_t>(c)] = order[0];
    worst_share = std::min(worst_share, share);
    std::printf("  cluster %ld → experts %d, %d  %5.1f%%\n", static_cast<long>(c), order[0], order[1], 100 * share);
  }
  std::sort(lead.begin(), lead.end());
  const auto used = std::unique(lead.begin(), lead.end()) - lead.begin();
  // Specialised: every cluster served mostly by two experts (uniform routing would give 2/E of
  // its weight to any two), and the clusters spread out.
  const bool specialised = worst_share >= 0.7 && used >= experts / 2;
  const double ratio = first_loss / final_loss;
  std::printf("\nloss %.5f → %.5f (÷%.1f); experts %s (%ld of %ld lead for a cluster)\n", first_loss,
              final_loss, ratio, specialised ? "specialised" : "NOT specialised", static_cast<long>(used),
              static_cast<long>(experts));

  // Without a mixture: one SwiGLU network as wide as the K experts a token uses together.
  Dense<Trained> dense({.hidden = hidden, .ffn = 2 * ffn, .experts = 1, .seed = seed});
  train(dense, task, steps, false);
  const double dense_loss = evaluate(dense, task, x, target, y, cluster);
  std::printf("one dense SwiGLU of width %ld (the same compute per token), same training: loss %.5f, "
              "%.1f× the mixture's\n", static_cast<long>(2 * ffn), dense_loss, dense_loss / final_loss);

  // In bf16: the same layer, seed and batches in float, for the loss bf16 costs.
  bool near_float = true;
  if constexpr (serves_int8) {
    auto served = moekit::convert_layer<::Layer<Balancer, moekit::int8>>(layer);
    Matrix y_int8(batch, hidden);
    task.sample(x, target, cluster);
    layer.forward(x, y);
    served.forward(x, y_int8);
    const double loss = (y - target).squaredNorm() / static_cast<double>(y.size());
    const double int8_loss = (y_int8 - target).squaredNorm() / static_cast<double>(y.size());
    const double error = (y_int8 - y).norm() / y.norm();
    near_float = error <= int8_output_bound && int8_loss <= int8_loss_factor * loss;
    std::printf("converted to %s: output within %.2f%% of float's (at most %.0f%%), loss %.6f against %.6f, "
                "%.3f× (at most %.1f×)\n", decltype(served)::name().c_str(), 100 * error, 100 * int8_output_bound,
                int8_loss, loss, int8_loss / loss, int8_loss_factor);
  } else if constexpr (!std::is_same_v<Precision, Float>) {
    Task float_task(seed);
    ::Layer<Balancer> in_float({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed});
    train(in_float, float_task, steps, false);
    const double float_loss = evaluate(in_float, float_task, x, target, y, cluster);
    near_float = final_loss <= bf16_loss_factor * float_loss;
    std::printf("the same layer in float, same seed and training: loss %.6f; bf16 ends at %.6f, %.3f× it (at most %.1f×)\n",
                float_loss, final_loss, final_loss / float_loss, bf16_loss_factor);
  }

  const bool ok = ratio >= 10 && specialised && dense_loss > 2 * final_loss && near_float;
  if (ok)
    std::printf("train_mixture: passed (loss down ÷%.1f, experts specialised, a dense network of the same "
                "compute %.1f× worse)\n", ratio, dense_loss / final_loss);
  else
    std::printf("train_mixture: FAILED (expected loss down ≥10×, each cluster ≥70%% of its weight on two experts, "
                "clusters over ≥ half the experts, a dense network of the same compute ≥2× worse, in bf16 "
                "a loss within %.1f× the float run's, in int8 an output within %.0f%% and a loss within %.1f× "
                "float's)\n", bf16_loss_factor, 100 * int8_output_bound, int8_loss_factor);
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  int steps = 600;
  unsigned seed = 1;
  std::string balancer = "auxloss", precision = "f32";
  bool expert_parallel = false, understood = true;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    const bool has_value = i + 1 < argc;
    if (flag == "--expert-parallel") expert_parallel = true, --i;
    else if (flag == "--steps" && has_value) steps = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--seed" && has_value) seed = static_cast<unsigned>(std::atoi(argv[i + 1]));
    else if (flag == "--balancer" && has_value) balancer = argv[i + 1];
    else if (flag == "--precision" && has_value) precision = argv[i + 1];
    else understood = false;
  }
  auto train = [&]<class Balancer>() {
#if MOEKIT_EXAMPLE_EXPERT_PARALLEL
    if (expert_parallel) return mixture::run_expert_parallel<Balancer>(argc, argv, steps, seed);
#else
    if (expert_parallel) {
      std::fprintf(stderr, "train_mixture: --expert-parallel needs a build with moekit::distributed; "
                           "this one was configured with MOEKIT_DISTRIBUTED=OFF\n");
      return 2;
    }
#endif
    if (precision == "bf16") return run<Balancer, moekit::bf16>(steps, seed);
    if (precision == "int8") return run<Balancer, moekit::int8>(steps, seed);
    return run<Balancer>(steps, seed);
  };
  understood = understood && (precision == "f32" || ((precision == "bf16" || precision == "int8") && !expert_parallel));
  if (understood) {
    if (balancer == "auxloss") return train.template operator()<moekit::AuxLoss>();
    if (balancer == "sinkhorn") return train.template operator()<moekit::Sinkhorn>();
    if (balancer == "auxfree") return train.template operator()<moekit::AuxFree>();
    if (balancer == "none") return train.template operator()<moekit::NoBalance>();
  }
  std::fprintf(stderr, "usage: train_mixture [--steps N] [--seed S] [--balancer auxloss|sinkhorn|auxfree|none] "
                       "[--precision f32|bf16|int8] [--expert-parallel (under mpirun, f32)]\n");
  return 2;
}
