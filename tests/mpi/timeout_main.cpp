// A rank that leaves without its forward (it failed, or exited normally) does not leave the
// others waiting for ever: after ExpertParallel::Options::timeout they throw a moekit::error
// naming what they waited for. Run under mpirun with two ranks; the job is then ended.
#include <chrono>
#include <cstdio>

#include <boost/mpi/environment.hpp>

#include <moekit/distributed.hpp>

int main(int argc, char** argv) {
  boost::mpi::environment environment(argc, argv);
  const boost::mpi::communicator world;
  using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::ExpertParallel, double>;
  Layer layer({.hidden = 4, .ffn = 6, .experts = 2 * world.size(), .seed = 1},
              moekit::ExpertParallel({.timeout = std::chrono::seconds(2)}));
  if (world.rank() == 1) return 0;  // leaves without its forward
  const auto start = std::chrono::steady_clock::now();
  try {
    layer.forward(moekit::Matrix<double>::Ones(3, 4));
    std::puts("rank 0 finished its forward although rank 1 never joined");
  } catch (const moekit::error& e) {
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("rank 0 gave up after %.0f s: %s\n", waited, e.what());
  }
  std::fflush(stdout);
  MPI_Abort(world, 0);  // the abandoned collective cannot be finished: end the job
}
