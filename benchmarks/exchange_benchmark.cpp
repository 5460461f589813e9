// The expert-parallel exchange against plain MPI_Alltoallv of the same counts on the same
// communicator, in the same run; then the layer's step time at a fixed batch per rank (weak
// scaling: run it at 1, 2, 4, ... ranks). The OSU method: warm-up, then timed repetitions with a
// barrier between them outside the timed window; a repetition's time is the slowest rank's.
//
//   mpirun -np 4 exchange_benchmark [--tokens T] [--hidden H] [--repetitions N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <boost/mpi/environment.hpp>
#include <mpi.h>

#include <moekit/distributed.hpp>

namespace {

using Clock = std::chrono::steady_clock;
const boost::mpi::communicator& world() {
  static const boost::mpi::communicator w;
  return w;
}

/// Median over repetitions of the slowest rank's time of `body`, in microseconds.
template <class F>
double time_us(int repetitions, F&& body) {
  for (int i = 0; i < 3; ++i) body();
  std::vector<double> times;
  for (int i = 0; i < repetitions; ++i) {
    MPI_Barrier(world());
    const auto start = Clock::now();
    body();
    double mine = std::chrono::duration<double, std::micro>(Clock::now() - start).count(), slowest = 0;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, world());
    times.push_back(slowest);
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

/// Rows this rank sends to each expert: uniform, or skewed (expert e gets weight 1/(e+1)²).
std::vector<moekit::Index> rows_per_expert(moekit::Index rows, moekit::Index experts, bool skewed) {
  std::vector<double> share(static_cast<std::size_t>(experts), 1.0);
  if (skewed)
    for (moekit::Index e = 0; e < experts; ++e) share[static_cast<std::size_t>(e)] = 1.0 / double((e + 1) * (e + 1));
  double total = 0;
  for (double s : share) total += s;
  std::vector<moekit::Index> counts(static_cast<std::size_t>(experts));
  moekit::Index given = 0;
  for (moekit::Index e = 0; e < experts; ++e) {
    counts[static_cast<std::size_t>(e)] = static_cast<moekit::Index>(double(rows) * share[static_cast<std::size_t>(e)] / total);
    given += counts[static_cast<std::size_t>(e)];
  }
  counts[0] += rows - given;
  return counts;
}

}  // namespace

int main(int argc, char** argv) {
  boost::mpi::environment environment(argc, argv, boost::mpi::threading::funneled);
  moekit::Index tokens = 2048, hidden = 1024;
  int repetitions = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tokens") tokens = std::atol(argv[i + 1]);
    else if (flag == "--hidden") hidden = std::atol(argv[i + 1]);
    else if (flag == "--repetitions") repetitions = std::max(1, std::atoi(argv[i + 1]));
  }
  const int ranks = world().size(), rank = world().rank();
  const moekit::Index experts = 8 * ranks, top_k = 2, rows = tokens * top_k;
  const bool root = rank == 0;
  if (root)
    std::printf("exchange_benchmark: %d ranks, %ld tokens a rank, K = 2, H = %ld, E = %ld, float; median of %d\n\n",
                ranks, static_cast<long>(tokens), static_cast<long>(hidden), static_cast<long>(experts), repetitions);

  // ---- the exchange against MPI_Alltoallv of the same counts ----
  moekit::ExpertParallel parallel;
  parallel.validate({hidden, 8, experts, 2});
  const moekit::Matrix<float> send = moekit::Matrix<float>::Random(rows, hidden);
  if (root) std::printf("| counts | MB a rank sends | MPI_Alltoallv there and back | moekit exchange there and back | ratio |\n| --- | --- | --- | --- | --- |\n");
  for (bool skewed : {false, true}) {
    const auto counts = rows_per_expert(rows, experts, skewed);
    parallel.route(counts);
    moekit::Matrix<float> at_experts(parallel.expert_rows(), hidden), back(rows, hidden);
    // The same counts per rank, as MPI_Alltoallv wants them (in rows of H floats).
    const moekit::Index local = experts / ranks;
    std::vector<int> send_counts(static_cast<std::size_t>(ranks)), recv_counts(static_cast<std::size_t>(ranks)),
        send_displacements(static_cast<std::size_t>(ranks)), recv_displacements(static_cast<std::size_t>(ranks));
    std::vector<moekit::Index> received(static_cast<std::size_t>(experts));
    MPI_Alltoall(counts.data(), static_cast<int>(local), MPI_INT64_T, received.data(), static_cast<int>(local),
                 MPI_INT64_T, world());
    int sent = 0, got = 0;
    for (int p = 0; p < ranks; ++p) {
      int s = 0, r = 0;
      for (moekit::Index l = 0; l < local; ++l) {
        s += static_cast<int>(counts[static_cast<std::size_t>(p * local + l)]);
        r += static_cast<int>(received[static_cast<std::size_t>(p * local + l)]);
      }
      send_counts[static_cast<std::size_t>(p)] = s;
      recv_counts[static_cast<std::size_t>(p)] = r;
      send_displacements[static_cast<std::size_t>(p)] = sent;
      recv_displacements[static_cast<std::size_t>(p)] = got;
      sent += s;
      got += r;
    }
    MPI_Datatype row;
    MPI_Type_contiguous(static_cast<int>(hidden), MPI_FLOAT, &row);
    MPI_Type_commit(&row);
    moekit::Matrix<float> plain(got, hidden), plain_back(rows, hidden);
    const double raw = time_us(repetitions, [&] {
      MPI_Alltoallv(send.data(), send_counts.data(), send_displacements.data(), row, plain.data(), recv_counts.data(),
                    recv_displacements.data(), row, world());
      MPI_Alltoallv(plain.data(), recv_counts.data(), recv_displacements.data(), row, plain_back.data(),
                    send_counts.data(), send_displacements.data(), row, world());
    });
    const double ours = time_us(repetitions, [&] {
      parallel.to_experts<float>(send, at_experts);
      parallel.to_tokens<float>(at_experts, back);
    });
    MPI_Type_free(&row);
    if (root)
      std::printf("| %s | %.1f | %.0f µs | %.0f µs | %.2f× |\n", skewed ? "skewed (1/(e+1)²)" : "uniform",
                  double(rows * hidden * 4) / 1e6, raw, ours, ours / raw);
  }

  // ---- the layer's step at a fixed batch per rank (weak scaling), with and without overlap ----
  using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::ExpertParallel, float>;
  const moekit::Index ffn = 4 * hidden / 8;  // keeps one step short on small machines
  const moekit::Matrix<float> x = moekit::Matrix<float>::Random(tokens, hidden) * 0.1f;
  moekit::Matrix<float> y(tokens, hidden), dx(tokens, hidden);
  if (root)
    std::printf("\nthe layer: F = %ld, E = 8 a rank; forward + backward + reduce_gradients a step\n\n"
                "| chunks | step | tokens/s over all %d ranks |\n| --- | --- | --- |\n",
                static_cast<long>(ffn), ranks);
  for (int chunks : {1, 2, 4}) {
    if (chunks > 1 && ranks == 1) break;  // nothing travels, nothing to overlap
    Layer layer({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = 1},
                moekit::ExpertParallel(moekit::ExpertParallel::groups(world()), {.chunks = chunks}));
    const double step = time_us(std::max(3, repetitions / 4), [&] {
      layer.forward(x, y);
      layer.backward(y, dx);
      layer.reduce_gradients();
    });
    if (root) std::printf("| %d | %.1f ms | %.0f |\n", chunks, step / 1e3, double(tokens) * ranks / (step / 1e6));
  }
  return 0;
}
