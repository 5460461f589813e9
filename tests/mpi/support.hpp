#pragma once
// Helpers for tests that run on every rank: results are agreed before they are asserted, since
// an ASSERT that returns early on one rank would leave the others waiting in a collective.
#include <algorithm>
#include <string>

#include <boost/mpi/communicator.hpp>
#include <mpi.h>

#include <moekit/distributed.hpp>

#include "../support/errors.hpp"
#include "../support/random.hpp"

namespace moekit::test {

inline const boost::mpi::communicator& world() {
  static const boost::mpi::communicator w;
  return w;
}

/// The largest value any rank has.
inline double worst(double mine) {
  double all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_DOUBLE, MPI_MAX, world());
  return all;
}

/// max |a − b| / max |b|, over every value.
template <class A, class B>
double relative_error(const A& a, const B& b) {
  double diff = 0, scale = 0;
  const auto n = static_cast<std::ptrdiff_t>(b.size());
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double(a.data()[i]) - double(b.data()[i])));
    scale = std::max(scale, std::abs(double(b.data()[i])));
  }
  return scale == 0 ? diff : diff / scale;
}

}  // namespace moekit::test
