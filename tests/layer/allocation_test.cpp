// No heap allocation in the steady state: after the first forward and backward of a shape,
// repeating them allocates nothing. Every allocation in the process is counted, Eigen's and
// TBB's included (tests/support/heap.hpp).
#include <gtest/gtest.h>

#include <vector>

#include <tbb/task_arena.h>

#include <moekit/moekit.hpp>

#include "../support/heap.hpp"

namespace moekit {
namespace {

/// Allocations made by `steps` repetitions of forward + backward after a first one.
template <class Layer>
long steady_state_allocations(Layer& layer, Index tokens, int steps) {
  const Matrix<typename Layer::scalar_type> x = Matrix<typename Layer::scalar_type>::Random(tokens, layer.shape().hidden);
  Matrix<typename Layer::scalar_type> y(tokens, layer.shape().hidden), dx(tokens, layer.shape().hidden);
  layer.forward(x, y);
  layer.backward(y, dx);
  const heap::Watch watch;
  for (int i = 0; i < steps; ++i) {
    layer.forward(x, y);
    layer.backward(y, dx);
  }
  return watch.report().allocations;
}

TEST(SteadyState, TheCounterSeesAllocations) {  // the test below could fail
  const heap::Watch watch;
  std::vector<double> v(1000);
  EXPECT_GE(watch.report().allocations, 1);
  EXPECT_GE(watch.report().peak_bytes, long(sizeof(double)) * 1000);
}

TEST(SteadyState, DefaultLayerAllocatesNothingAfterTheFirstStep) {
  MoELayer<TopK<2>, float> layer({.hidden = 64, .ffn = 96, .experts = 8, .seed = 1});
  EXPECT_EQ(steady_state_allocations(layer, 300, 5), 0);
}

TEST(SteadyState, ProductsLargerThanEigensStackBlocksAllocateNothingEither) {
  // Eigen's product operator packs blocks past 128 KiB on the heap at every call; the layer's
  // GEMMs pack into buffers they keep (core/detail/gemm.hpp).
  MoELayer<TopK<2>, float> layer({.hidden = 256, .ffn = 512, .experts = 2, .seed = 1});
  EXPECT_EQ(steady_state_allocations(layer, 256, 2), 0);
}

TEST(SteadyState, EveryShippedBalancerAndDispatcher) {
  MoELayer<TopK<2>, Sinkhorn, double> sinkhorn({.hidden = 16, .ffn = 24, .experts = 4, .seed = 1});
  EXPECT_EQ(steady_state_allocations(sinkhorn, 100, 3), 0) << "Sinkhorn";
  MoELayer<TopK<2>, AuxFree, Capacity, GroupedGemmType<GeLU>, float> capacity(
      {.hidden = 16, .ffn = 24, .experts = 4, .seed = 1}, Capacity{{.capacity_factor = 0.5, .renormalize = true}});
  EXPECT_EQ(steady_state_allocations(capacity, 100, 3), 0) << "AuxFree + Capacity";
  MoELayer<Switch, NoBalance, PerExpertLoop, float> reference({.hidden = 16, .ffn = 24, .experts = 4, .seed = 1});
  EXPECT_EQ(steady_state_allocations(reference, 100, 3), 0) << "PerExpertLoop";
}

TEST(SteadyState, ExpertChoiceAllocatesNothingEither) {  // its choice's buffers are the router's own
  MoELayer<ExpertChoice, ZLoss, float> layer({.hidden = 16, .ffn = 24, .experts = 4, .seed = 1});
  EXPECT_EQ(steady_state_allocations(layer, 100, 3), 0);
}

/// Peak memory of the layer's first forward + backward over the activations backward needs
/// saved — x [T,H], scores [T,E], the dispatched rows and the experts' outputs [S,H], and
/// SwiGLU's gate, up and hidden [S,F] (S = T·K rows). Backward's gradients overwrite them.
double peak_over_saved(Index tokens, Index hidden, Index ffn, Index experts) {
  MoELayer<TopK<2>, float> layer({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = 1});
  const Matrix<float> x = Matrix<float>::Random(tokens, hidden);
  Matrix<float> y(tokens, hidden), dx(tokens, hidden);
  const Index rows = 2 * tokens;
  const double saved = double(tokens * hidden + tokens * experts + 2 * rows * hidden + 3 * rows * ffn) * sizeof(float);

  const heap::Watch watch;  // the layer's first step: every buffer is allocated in it
  layer.forward(x, y);
  layer.backward(y, dx);
  const double peak = double(watch.report().peak_bytes);
  EXPECT_GE(peak, saved) << "the counter must see the saved activations";
  return peak / saved;
}

TEST(PeakMemory, ForwardAndBackwardStayWithinOneAndAHalfTimesTheSavedActivations) {
  EXPECT_LE(peak_over_saved(512, 64, 128, 8), 1.5);
}

TEST(PeakMemory, SixteenThreadsOnASmallBatchStayWithinOneAndAHalfTimesToo) {
  // Every thread keeps packing buffers: with products deeper than max_packed_depth (H = 512,
  // F = 1024) and a batch of 1024 tokens, sixteen threads' buffers are what could break it.
  double ratio = 0;
  tbb::task_arena(16).execute([&] { ratio = peak_over_saved(1024, 512, 1024, 4); });
  EXPECT_LE(ratio, 1.5);
}

}  // namespace
}  // namespace moekit
