// GoogleTest under mpirun: MPI starts before the tests, only rank 0 prints, and every rank exits
// with the worst result of any rank, so a failure seen on one rank fails the run.
#include <gtest/gtest.h>

#include <boost/mpi/communicator.hpp>
#include <boost/mpi/environment.hpp>
#include <mpi.h>

int main(int argc, char** argv) {
  boost::mpi::environment environment(argc, argv, boost::mpi::threading::funneled);
  ::testing::InitGoogleTest(&argc, argv);
  const boost::mpi::communicator world;
  if (world.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int result = RUN_ALL_TESTS(), worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, world);
  return worst;
}
