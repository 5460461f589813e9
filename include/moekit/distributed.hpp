#pragma once
// moekit over MPI ranks: everything of <moekit/moekit.hpp>, and expert parallelism. Link
// moekit::distributed (Boost.MPI over Open MPI) to use it. docs/distributed.md
//
//   using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::ExpertParallel>;
//
//   parallel/  ExpertParallel, its Groups and Options   parallel/expert_parallel.hpp
//              ProcessGrid: Megatron-Core's rank layout parallel/grid.hpp (no MPI itself)
//              Communicator and the exchanges           parallel/mpi.hpp
#include <moekit/moekit.hpp>
#include <moekit/parallel/expert_parallel.hpp>
#include <moekit/parallel/grid.hpp>
#include <moekit/parallel/mpi.hpp>
