#pragma once
// Everything moekit asks of TBB in one process, behind four plain functions: the parallel loops
// take their body by a FunctionRef, so TBB's loop templates are compiled once, not once per loop
// body. With MOEKIT_COMPILED_KERNELS the functions are only declared here, and defined once in
// moekit/compiled_kernels.cpp: a translation unit that uses the layer then parses no TBB header
// (the heaviest moekit includes: docs/getting_started.md#compile-time). Define it in every
// translation unit of a program or in none.
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

#include <moekit/core/tensor.hpp>

#ifdef MOEKIT_COMPILED_KERNELS
#define MOEKIT_THREADS_INLINE
#else
#define MOEKIT_THREADS_INLINE inline
#endif

namespace moekit::detail {

/// A reference to a callable with the signature void(Args...), called through one pointer. It
/// does not own the callable, which must outlive the call it is passed to.
template <class... Args>
class FunctionRef {
 public:
  template <class F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef>)
  FunctionRef(F& f)
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* object, Args... args) { (*static_cast<F*>(object))(std::forward<Args>(args)...); }) {}
  void operator()(Args... args) const { call_(object_, std::forward<Args>(args)...); }

 private:
  void* object_;
  void (*call_)(void*, Args...);
};

/// body(b) for each b of [0, blocks), in parallel; TBB splits the range as it likes.
MOEKIT_THREADS_INLINE void parallel_for_blocks(Index blocks, FunctionRef<Index> body);
/// body() once on each of `runners` tasks, in parallel, one task each (TBB's simple partitioner).
MOEKIT_THREADS_INLINE void parallel_runners(std::size_t runners, FunctionRef<> body);
/// The threads of the calling thread's task arena.
MOEKIT_THREADS_INLINE int max_threads();
/// The calling thread's index in its task arena; negative outside one.
MOEKIT_THREADS_INLINE int thread_index();

}  // namespace moekit::detail

#if !defined(MOEKIT_COMPILED_KERNELS) || defined(MOEKIT_DEFINE_THREADS)
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

namespace moekit::detail {

MOEKIT_THREADS_INLINE void parallel_for_blocks(Index blocks, FunctionRef<Index> body) {
  tbb::parallel_for(tbb::blocked_range<Index>(0, blocks, 1), [&](const tbb::blocked_range<Index>& r) {
    for (Index b = r.begin(); b != r.end(); ++b) body(b);
  });
}

MOEKIT_THREADS_INLINE void parallel_runners(std::size_t runners, FunctionRef<> body) {
  tbb::parallel_for(std::size_t{0}, runners, [&](std::size_t) { body(); }, tbb::simple_partitioner{});
}

MOEKIT_THREADS_INLINE int max_threads() { return tbb::this_task_arena::max_concurrency(); }

MOEKIT_THREADS_INLINE int thread_index() { return tbb::this_task_arena::current_thread_index(); }

}  // namespace moekit::detail
#endif
