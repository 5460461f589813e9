#pragma once
// train_mixture --expert-parallel: the same task with the experts split over MPI ranks, beside
// the same layer in one process, to show that expert parallelism changes where the work runs
// and nothing else.
//
//   mpirun -np 4 train_mixture --expert-parallel [--steps N] [--seed S] [--balancer B]
//
// Every rank draws the same global batch and keeps its share of the rows; the layer over the
// ranks (ExpertParallel, E = 8 split over the ranks) trains on the shares while rank 0 also
// trains the single-process layer on the whole batch. Exits non-zero unless the two loss curves
// agree within 1e-3 relative at every step and the loss falls at least 10×.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include <boost/mpi/environment.hpp>
#include <mpi.h>

#include <moekit/distributed.hpp>

#include "mixture_task.hpp"

namespace mixture {

/// Over MPI ranks (one per process of mpirun), beside the single-process layer on rank 0.
template <class Balancer>
int run_expert_parallel(int argc, char** argv, int steps, unsigned seed) {
  using Distributed = moekit::MoELayer<moekit::TopK<2>, Balancer, moekit::ExpertParallel, float>;
  using OneProcess = moekit::MoELayer<moekit::TopK<2>, Balancer, float>;
  boost::mpi::environment environment(argc, argv);
  const boost::mpi::communicator world;
  const int ranks = world.size(), rank = world.rank();
  if (experts % ranks != 0 || batch % ranks != 0) {
    if (rank == 0) std::fprintf(stderr, "train_mixture --expert-parallel: %d ranks; expected a divisor of %ld\n", ranks, static_cast<long>(experts));
    return 2;
  }
  const moekit::LayerConfig config{.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed};
  Distributed layer(config);  // ExpertParallel over MPI_COMM_WORLD: E/ranks experts here
  OneProcess reference(config);
  moekit::Adam<float> adam({.learning_rate = 3e-3}), reference_adam({.learning_rate = 3e-3});

  Task task(seed);  // the same draws on every rank
  const moekit::Index share = batch / ranks, first = rank * share;
  Matrix x(batch, hidden), target(batch, hidden);
  std::vector<int> cluster(batch);
  if (rank == 0)
    std::printf("train_mixture --expert-parallel: %d ranks, %ld experts each, %ld of %ld tokens a step each; layer %s\n\n",
                ranks, static_cast<long>(experts / ranks), static_cast<long>(share), static_cast<long>(batch),
                Distributed::name().c_str());

  double first_loss = 0, worst_gap = 0, loss = 0;
  for (int step = 1; step <= steps; ++step) {
    task.sample(x, target, cluster);
    // Over the ranks: each rank's loss is the mean over its rows; reduce_gradients averages.
    const Matrix y = layer.forward(x.middleRows(first, share));
    const Matrix diff = y - target.middleRows(first, share);
    const Matrix dy = diff * (2.0f / static_cast<float>(diff.size()));
    double local = diff.squaredNorm() / static_cast<double>(diff.size());
    MPI_Allreduce(&local, &loss, 1, MPI_DOUBLE, MPI_SUM, world);
    loss /= ranks;
    layer.zero_grad();
    layer.backward(dy);
    layer.reduce_gradients();
    adam.step(layer.parameters(), layer.gradients());
    layer.end_step();

    if (rank == 0) {  // the same layer in one process, on the whole batch
      const Matrix y1 = reference.forward(x);
      const double loss1 = (y1 - target).squaredNorm() / static_cast<double>(y1.size());
      reference.zero_grad();
      reference.backward((y1 - target) * (2.0f / static_cast<float>(y1.size())));
      reference_adam.step(reference.parameters(), reference.gradients());
      reference.end_step();
      const double gap = std::abs(loss - loss1) / loss1;
      worst_gap = std::max(worst_gap, gap);
      if (step == 1) first_loss = loss;
      if (step == 1 || step % std::max(1, steps / 10) == 0 || step == steps)
        std::printf("step %4d  loss over %d ranks %.6f  in one process %.6f  relative gap %.1e\n", step, ranks,
                    loss, loss1, gap);
    }
  }
  int ok = 1;
  if (rank == 0) {
    ok = worst_gap <= 1e-3 && first_loss / loss >= 10;
    std::printf("\nloss %.5f → %.5f (÷%.1f); largest gap between the curves %.1e: %s\n", first_loss, loss,
                first_loss / loss, worst_gap,
                ok ? "the distributed layer follows the single-process one"
                   : "FAILED (expected a gap ≤ 1e-3 and the loss down ≥10×)");
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, world);
  return ok ? 0 : 1;
}

}  // namespace mixture
