// Built against moekit::moekit alone: with CMake, and with nothing but
//   g++ -std=c++20 -I<prefix>/include -I/usr/include/eigen3 main.cpp -ltbb
#include <moekit/moekit.hpp>

#include <cstdio>

// mpi.h is on no compiler's own include path: reaching it would mean an MPI path came with moekit.
#if __has_include(<mpi.h>)
#error "an MPI include path reached a project that uses moekit::moekit alone"
#endif

int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless, moekit::GroupedGemm> layer(
      {.hidden = 8, .ffn = 16, .experts = 4});
  const moekit::Matrix<float> x = moekit::Matrix<float>::Random(5, 8);
  const auto y = layer.forward(x);
  const auto dx = layer.backward(y);
  std::printf("consumer: y %ldx%ld, dx %ldx%ld\n", long(y.rows()), long(y.cols()), long(dx.rows()), long(dx.cols()));
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}
