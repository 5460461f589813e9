#pragma once
// Watches every heap allocation in the process — Eigen's and TBB's included — by interposing the
// C allocator (glibc exports the originals as __libc_*), or, under AddressSanitizer, which
// replaces the allocator itself, through its hooks. Counts allocations, and tracks the bytes in
// use and their peak. Defines malloc and free (or installs the hooks): include this header in ONE
// translation unit of an executable (a test or a benchmark), never in a library.
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>

namespace heap {

namespace detail {
inline std::atomic<bool> watching{false};
inline std::atomic<long> allocations{0};
inline std::atomic<long> in_use{0}, peak{0};  // bytes, as malloc_usable_size counts them

inline void* allocated(void* p) {
  if (p && watching.load(std::memory_order_relaxed)) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    const long now = in_use.fetch_add(long(malloc_usable_size(p)), std::memory_order_relaxed) +
                     long(malloc_usable_size(p));
    long seen = peak.load(std::memory_order_relaxed);
    while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
  }
  return p;
}
inline void released(void* p) {
  if (p && watching.load(std::memory_order_relaxed))
    in_use.fetch_sub(long(malloc_usable_size(p)), std::memory_order_relaxed);
}
}  // namespace detail

/// What happened on the heap while a Watch lived.
struct Report {
  long allocations = 0;
  long peak_bytes = 0;  // the most bytes in use at once, above the level at the start
};

/// Watches the heap from construction to report(). Blocks freed during the watch that were
/// allocated before it lower the level below the start; the peak is never below 0.
class Watch {
 public:
  Watch() {
    detail::allocations = 0;
    detail::in_use = 0;
    detail::peak = 0;
    detail::watching = true;
  }
  ~Watch() { detail::watching = false; }
  Watch(const Watch&) = delete;
  Watch& operator=(const Watch&) = delete;

  Report report() const { return {detail::allocations.load(), std::max(0L, detail::peak.load())}; }
};

}  // namespace heap

#if defined(__SANITIZE_ADDRESS__)
extern "C" int __sanitizer_install_malloc_and_free_hooks(void (*)(const volatile void*, std::size_t),
                                                         void (*)(const volatile void*));
// (declared here: GCC does not install the sanitizers' headers)

namespace heap::detail {
inline void on_malloc(const volatile void* p, std::size_t) { allocated(const_cast<void*>(p)); }
inline void on_free(const volatile void* p) { released(const_cast<void*>(p)); }
[[maybe_unused]] const int hooks_installed = __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}  // namespace heap::detail
#else
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) { return heap::detail::allocated(__libc_malloc(n)); }
void* calloc(std::size_t n, std::size_t size) { return heap::detail::allocated(__libc_calloc(n, size)); }
void* realloc(void* p, std::size_t n) {
  heap::detail::released(p);
  return heap::detail::allocated(__libc_realloc(p, n));
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  return heap::detail::allocated(__libc_memalign(alignment, n));
}
void* memalign(std::size_t alignment, std::size_t n) {
  return heap::detail::allocated(__libc_memalign(alignment, n));
}
int posix_memalign(void** p, std::size_t alignment, std::size_t n) {
  *p = heap::detail::allocated(__libc_memalign(alignment, n));
  return *p ? 0 : ENOMEM;
}
void free(void* p) {
  heap::detail::released(p);
  __libc_free(p);
}
}
#endif
