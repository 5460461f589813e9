// An exception that escapes one rank ends the whole job, while the other ranks wait inside the
// layer's collectives: mpirun must return (the CTest timeout guards it) and print the message.
#include <cstdio>
#include <stdexcept>

#include <boost/mpi/environment.hpp>

#include <moekit/distributed.hpp>

int main(int argc, char** argv) {
  boost::mpi::environment environment(argc, argv);
  const boost::mpi::communicator world;
  using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::ExpertParallel, double>;
  Layer layer({.hidden = 4, .ffn = 6, .experts = 2 * world.size(), .seed = 1});
  const moekit::Matrix<double> x = moekit::Matrix<double>::Ones(3, 4);
  if (world.rank() == 1) throw std::runtime_error("rank 1 gave up before its forward");
  layer.forward(x);  // the others wait here for rank 1
  std::puts("a rank finished although rank 1 never joined: the job should have ended");
  return 0;
}
