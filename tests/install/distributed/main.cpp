// Built against moekit::distributed and run under mpirun: the experts split over the ranks give
// what one process gives for the whole batch.
#include <moekit/distributed.hpp>

#include <boost/mpi/environment.hpp>

#include <cmath>
#include <cstdio>

int main(int argc, char** argv) {
  boost::mpi::environment environment(argc, argv);
  const boost::mpi::communicator world;
  const moekit::LayerConfig config{.hidden = 8, .ffn = 16, .experts = 2 * world.size(), .seed = 3};
  moekit::MoELayer<moekit::TopK<2>, moekit::ExpertParallel, double> distributed(config);
  moekit::MoELayer<moekit::TopK<2>, double> one_process(config);

  const Eigen::Index rows = 3;  // per rank; every rank draws the whole batch and keeps its share
  const moekit::Matrix<double> batch = moekit::Matrix<double>::Random(rows * world.size(), 8);
  const moekit::Matrix<double> mine = batch.middleRows(rows * world.rank(), rows);
  const moekit::Matrix<double> y = distributed.forward(mine);
  const moekit::Matrix<double> expected = one_process.forward(batch).middleRows(rows * world.rank(), rows);
  const double error = (y - expected).cwiseAbs().maxCoeff();
  std::printf("distributed consumer: rank %d of %d, max |y - one process| = %.3g\n", world.rank(), world.size(), error);
  return error < 1e-12 ? 0 : 1;
}
