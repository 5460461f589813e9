#pragma once
// Scalars, Eigen aliases and the named tensor that holds parameters, gradients and saved state.
// Matrices are row-major: a row is a token, as in the [T,H] activations users pass in.
#include <Eigen/Core>
#include <concepts>
#include <cstddef>
#include <functional>
#include <new>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <moekit/core/error.hpp>

namespace moekit {

using Index = Eigen::Index;

/// The floating-point types a layer computes in.
template <class T>
concept Scalar = std::same_as<T, float> || std::same_as<T, double>;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<Matrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const Matrix<T>>;
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

template <Scalar T>
constexpr std::string_view scalar_name = std::same_as<T, float> ? "f32" : "f64";

namespace detail {

/// Allocates on cache-line (64-byte) boundaries, whatever vectors the build has: Eigen aligns to
/// its own packets (16 bytes with SSE2), and the decode kernel's 64-byte loads of a weight row
/// must not straddle two lines (docs/kernels.md#decode-kernel).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};

  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) = default;
};

/// The storage of tensors and buffers.
template <class T>
using AlignedValues = std::vector<T, CacheLineAllocator<T>>;

}  // namespace detail

/// The number of elements of a tensor of this shape.
inline Index element_count(std::span<const Index> shape) {
  return std::accumulate(shape.begin(), shape.end(), Index{1}, std::multiplies<>());
}

/// A named, dense, row-major tensor of rank 1 to 3.
template <Scalar T>
class Tensor {
 public:
  Tensor() = default;
  Tensor(std::string name, std::vector<Index> shape)
      : name_(std::move(name)), shape_(std::move(shape)), values_(static_cast<std::size_t>(element_count(shape_))) {}

  const std::string& name() const { return name_; }
  const std::vector<Index>& shape() const { return shape_; }
  Index rank() const { return static_cast<Index>(shape_.size()); }
  Index size() const { return static_cast<Index>(values_.size()); }
  T* data() { return values_.data(); }
  const T* data() const { return values_.data(); }
  std::span<T> values() { return values_; }
  std::span<const T> values() const { return values_; }
  void set_zero() { std::fill(values_.begin(), values_.end(), T(0)); }

  /// Rank 2: the tensor itself. Rank 1: a row vector.
  MatrixMap<T> matrix() { return {data(), rows(), cols()}; }
  ConstMatrixMap<T> matrix() const { return {data(), rows(), cols()}; }

  /// Rank 3 [d0,d1,d2]: the [d1,d2] matrix at index i of the first dimension (one expert).
  MatrixMap<T> slice(Index i) { return {data() + i * shape_[1] * shape_[2], shape_[1], shape_[2]}; }
  ConstMatrixMap<T> slice(Index i) const {
    return {data() + i * shape_[1] * shape_[2], shape_[1], shape_[2]};
  }

 private:
  Index rows() const { return rank() == 1 ? 1 : shape_[0]; }
  Index cols() const { return rank() == 1 ? shape_[0] : shape_[1]; }

  std::string name_;
  std::vector<Index> shape_;
  detail::AlignedValues<T> values_;
};

/// "[8,48,32]": how shapes appear in messages and docs.
inline std::string shape_string(std::span<const Index> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  s += ']';
  return s;
}

/// The name and shape of one parameter, as a policy declares it.
struct ParameterSpec {
  std::string name;
  std::vector<Index> shape;
  bool starts_at_zero = false;  // initialised to 0, taking no random draws (noisy gating's W_n)
};

namespace detail {

/// Storage that grows to the largest size asked of it and is then reused: the workspace rule
/// (no allocation in the steady state). Untyped and aligned to a cache line, so one scratch serves
/// any scalar; it backs one tensor or one run of bytes at a time, and keeps what it held as it grows.
class Scratch {
 public:
  /// At least `count` T.
  template <class T>
  T* data(std::size_t count) {
    const std::size_t needed = count * sizeof(T);
    if (bytes_.size() < needed) bytes_.resize(needed);
    return reinterpret_cast<T*>(bytes_.data());
  }
  template <Scalar T>
  MatrixMap<T> matrix(Index rows, Index cols) {
    return {data<T>(static_cast<std::size_t>(rows * cols)), rows, cols};
  }

 private:
  AlignedValues<std::byte> bytes_;
};

/// A Scratch that holds one scalar type: the layer's and its policies' buffers.
template <Scalar T>
class Buffer {
 public:
  MatrixMap<T> matrix(Index rows, Index cols) { return scratch_.matrix<T>(rows, cols); }

 private:
  Scratch scratch_;
};

}  // namespace detail
}  // namespace moekit
