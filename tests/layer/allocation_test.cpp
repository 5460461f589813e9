// No heap allocation in the steady state: after the first forward and backward of a shape,
// repeating them allocates nothing. Every allocation in the process is counted, Eigen's and
// TBB's included, by interposing the C allocator (glibc exports the originals as __libc_*).
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>

#include <moekit/moekit.hpp>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void count() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  count();
  return __libc_memalign(alignment, n);
}
int posix_memalign(void** p, std::size_t alignment, std::size_t n) {
  count();
  *p = __libc_memalign(alignment, n);
  return *p ? 0 : 12;
}
}

namespace moekit {
namespace {

/// Allocations made by `steps` repetitions of forward + backward after a first one.
template <class Layer>
long steady_state_allocations(Layer& layer, Index tokens, int steps) {
  const Matrix<typename Layer::scalar_type> x = Matrix<typename Layer::scalar_type>::Random(tokens, layer.shape().hidden);
  Matrix<typename Layer::scalar_type> y(tokens, layer.shape().hidden), dx(tokens, layer.shape().hidden);
  layer.forward(x, y);
  layer.backward(y, dx);
  allocations = 0;
  counting = true;
  for (int i = 0; i < steps; ++i) {
    layer.forward(x, y);
    layer.backward(y, dx);
  }
  counting = false;
  return allocations.load();
}

TEST(SteadyState, TheCounterSeesAllocations) {  // the test below could fail
  allocations = 0;
  counting = true;
  std::vector<double> v(1000);
  counting = false;
  EXPECT_GE(allocations.load(), 1);
}

TEST(SteadyState, DefaultLayerAllocatesNothingAfterTheFirstStep) {
  MoELayer<TopK<2>, float> layer({.hidden = 64, .ffn = 96, .experts = 8, .seed = 1});
  EXPECT_EQ(steady_state_allocations(layer, 300, 5), 0);
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

}  // namespace
}  // namespace moekit
