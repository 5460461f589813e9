#pragma once
// The layer's parameters and their gradients: named tensors, the replicated ones first (the
// router's weight, then the shared expert's) and then the routed experts', each with its shape in
// the whole layer and this rank's slice of it. Initialising,
// assigning the whole layer's values and reading or writing a safetensors file all go through the
// slice, so a layer split over ranks starts from, and loads, what one process would.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/error.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/io/safetensors.hpp>

namespace moekit {

template <Scalar T>
class LayerParameters {
 public:
  LayerParameters() = default;
  /// This rank's parameters and their shapes in the whole layer (one process), in the same
  /// order; an axis where they differ is this rank's experts (the first axis) or its slice of F
  /// (any other), starting at `experts.first` and `ffn.first`. The first `replicated` tensors
  /// (the router's `router_tensors`: its weight, any logit bias and any noise weight; then the shared expert's) are
  /// held whole on every rank.
  LayerParameters(std::vector<ParameterSpec> local, std::vector<std::vector<Index>> whole_shapes,
                  ExpertRange experts, ExpertRange ffn, std::size_t replicated = 1, std::size_t router_tensors = 1)
      : whole_(std::move(whole_shapes)), experts_(experts), ffn_(ffn), replicated_(replicated),
        router_tensors_(router_tensors) {
    for (auto& spec : local) {
      starts_at_zero_.push_back(spec.starts_at_zero);
      values_.emplace_back(spec.name, spec.shape);
      gradients_.emplace_back(std::move(spec.name), std::move(spec.shape));
    }
  }

  std::span<Tensor<T>> values() { return values_; }
  std::span<const Tensor<T>> values() const { return values_; }
  std::span<Tensor<T>> gradients() { return gradients_; }
  std::span<const Tensor<T>> gradients() const { return gradients_; }
  Tensor<T>& value(std::string_view name) { return find(values_, name); }
  const Tensor<T>& value(std::string_view name) const { return find(values_, name); }
  Tensor<T>& gradient(std::string_view name) { return find(gradients_, name); }
  const Tensor<T>& gradient(std::string_view name) const { return find(gradients_, name); }

  const Tensor<T>& router_weight() const { return values_.front(); }
  Tensor<T>& router_gradient() { return gradients_.front(); }
  /// router.logit_bias [E], for a router that has one.
  const Tensor<T>& router_bias() const { return values_[1]; }
  Tensor<T>& router_bias_gradient() { return gradients_[1]; }
  /// router.noise_weight [E,H], the last of the router's tensors, for a router with noisy gating.
  Tensor<T>& router_noise_weight() { return values_[router_tensors_ - 1]; }
  const Tensor<T>& router_noise_weight() const { return values_[router_tensors_ - 1]; }
  Tensor<T>& router_noise_gradient() { return gradients_[router_tensors_ - 1]; }
  std::span<const Tensor<T>> shared_weights() const {
    return std::span<const Tensor<T>>(values_).subspan(router_tensors_, replicated_ - router_tensors_);
  }
  std::span<Tensor<T>> shared_gradients() {
    return std::span<Tensor<T>>(gradients_).subspan(router_tensors_, replicated_ - router_tensors_);
  }
  std::span<const Tensor<T>> expert_weights() const { return std::span<const Tensor<T>>(values_).subspan(replicated_); }
  std::span<Tensor<T>> expert_gradients() { return std::span<Tensor<T>>(gradients_).subspan(replicated_); }
  /// The router's and the shared expert's: whole on every rank.
  std::span<Tensor<T>> replicated_gradients() { return std::span<Tensor<T>>(gradients_).first(replicated_); }

  /// A hash (FNV-1a) of the replicated values (router and shared expert), and of the routed
  /// experts': ranks that hold the same parameters give the same hashes.
  std::pair<std::uint64_t, std::uint64_t> hashes() const {
    auto hash = [](std::span<const Tensor<T>> tensors) {
      std::uint64_t h = 1469598103934665603ull;
      for (const auto& t : tensors) {
        const auto* bytes = reinterpret_cast<const unsigned char*>(t.data());
        for (std::size_t i = 0; i < t.values().size_bytes(); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
      }
      return h;
    };
    return {hash(std::span<const Tensor<T>>(values_).first(replicated_)), hash(expert_weights())};
  }

  void zero_grad() {
    for (auto& g : gradients_) g.set_zero();
  }

  /// Fresh values, as torch's Linear draws them: U(±1/√fan_in), fan_in = the last dim, drawn for
  /// the whole layer in order; this rank keeps its slice. A tensor that starts at zero takes no
  /// draws, so the others' values do not depend on whether it is there. Gradients are zeroed.
  void initialize(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<T> values;
    for (std::size_t i = 0; i < values_.size(); ++i) {
      if (starts_at_zero_[i]) {
        values_[i].set_zero();
        continue;
      }
      const double bound = 1.0 / std::sqrt(static_cast<double>(whole_[i].back()));
      std::uniform_real_distribution<double> draw(-bound, bound);
      values.resize(static_cast<std::size_t>(element_count(whole_[i])));
      for (T& v : values) v = static_cast<T>(draw(rng));
      take_slice(values, i);
    }
    zero_grad();
  }

  /// Sets every value from the whole layer's tensors (same names and order): this rank keeps
  /// its slice.
  void assign_whole(std::span<const Tensor<T>> whole) {
    require(whole.size() == values_.size(), "moekit::MoELayer::assign_whole: ", whole.size(),
            " tensors; expected ", values_.size(), " like parameters()");
    for (std::size_t i = 0; i < values_.size(); ++i) {
      require(whole[i].name() == values_[i].name() && whole[i].shape() == whole_[i],
              "moekit::MoELayer::assign_whole: tensor ", i, " is '", whole[i].name(), "' ",
              shape_string(whole[i].shape()), "; expected '", values_[i].name(), "' ",
              shape_string(whole_[i]));
      take_slice(whole[i].values(), i);
    }
  }

  /// Adds every value to `file` under its name, as this rank holds it; a rank that holds a slice
  /// says which in the file's metadata, so that no other rank loads it as its own.
  void write_to(io::SafeTensors& file) const {
    for (const auto& p : values_) file.add(p.name(), p.shape(), p.values());
    if (sliced()) {
      file.metadata()["slice.experts"] = range_text(experts_);
      file.metadata()["slice.ffn"] = range_text(ffn_);
    }
  }

  /// Checks that `file` (read from `path`) holds every parameter, F32 or F64, in this rank's
  /// shape or the whole layer's (a leading axis of 1 may be left out: the shared expert's
  /// [1,F_s,H] as Hugging Face's [F_s,H]); changes nothing.
  void check(const io::SafeTensors& file, const std::filesystem::path& path) const {
    for (std::size_t i = 0; i < values_.size(); ++i) {
      const auto& p = values_[i];
      require(file.contains(p.name()), "moekit::MoELayer::load: '", path.string(), "' has no tensor '", p.name(),
              "'; expected one of shape ", shape_string(p.shape()));
      const auto& info = file.info(p.name());
      require(info.shape == p.shape() || info.shape == whole_[i] || is_squeezed(info.shape, p.shape()),
              "moekit::MoELayer::load: '", path.string(), "' tensor '", p.name(), "' is ", shape_string(info.shape),
              "; expected ", shape_string(p.shape()),
              whole_[i] == p.shape() ? "" : " (this rank's slice) or " + shape_string(whole_[i]) + " (the whole layer)");
      require(info.dtype == io::DType::f32 || info.dtype == io::DType::f64, "moekit::MoELayer::load: '",
              path.string(), "' tensor '", p.name(), "' is ", io::to_string(info.dtype), "; expected F32 or F64");
      if (info.shape == p.shape() && p.shape() != whole_[i]) {  // a slice: this rank's own?
        const std::string experts = file.metadata("slice.experts", "none"), ffn = file.metadata("slice.ffn", "none");
        require(experts == range_text(experts_) && ffn == range_text(ffn_), "moekit::MoELayer::load: '",
                path.string(), "' holds the slice of experts ", experts, " and of F ", ffn, "; expected this rank's, ",
                range_text(experts_), " and ", range_text(ffn_), " (or the whole layer's tensors)");
      }
    }
  }

  /// Whether this rank holds a slice of the whole layer (over expert-parallel ranks) rather than all of it.
  bool sliced() const {
    for (std::size_t i = 0; i < values_.size(); ++i)
      if (values_[i].shape() != whole_[i]) return true;
    return false;
  }

  /// Sets every value from a file that passed check(): a whole-layer tensor gives this rank its slice.
  void read_from(const io::SafeTensors& file) {
    for (std::size_t i = 0; i < values_.size(); ++i) {
      auto& p = values_[i];
      const auto values = file.values<T>(p.name());
      if (const auto& shape = file.info(p.name()).shape; shape == p.shape() || is_squeezed(shape, p.shape()))
        std::copy(values.begin(), values.end(), p.values().begin());
      else
        take_slice(values, i);
    }
  }

 private:
  static auto& find(auto& tensors, std::string_view name) {
    for (auto& t : tensors)
      if (t.name() == name) return t;
    std::string known;
    for (const auto& t : tensors) known += (known.empty() ? "" : ", ") + t.name();
    fail("moekit::MoELayer: no parameter named '", name, "'; expected one of ", known);
  }

  /// Whether `shape` is `full` without its leading axis of 1.
  static bool is_squeezed(const std::vector<Index>& shape, const std::vector<Index>& full) {
    return full.size() == shape.size() + 1 && full.front() == 1 && std::equal(shape.begin(), shape.end(), full.begin() + 1);
  }

  /// "[4,8)": the first and one past the last of a range, as slice metadata writes it.
  static std::string range_text(ExpertRange r) {
    std::string text = "[";  // appended, not "[" + …: GCC 12 warns falsely (-Wrestrict) on that
    text += std::to_string(r.first);
    text += ',';
    text += std::to_string(r.first + r.count);
    text += ')';
    return text;
  }

  /// values_[i] = this rank's slice of `whole`, a tensor of shape whole_[i].
  void take_slice(std::span<const T> whole, std::size_t i) {
    const auto& whole_shape = whole_[i];
    const auto& shape = values_[i].shape();
    std::vector<Index> first(shape.size(), 0);
    for (std::size_t d = 0; d < shape.size(); ++d)
      if (shape[d] != whole_shape[d]) first[d] = d == 0 ? experts_.first : ffn_.first;
    auto values = values_[i].values();
    std::vector<Index> at(shape.size(), 0);
    for (std::size_t v = 0; v < values.size(); ++v) {
      Index flat = 0;
      for (std::size_t d = 0; d < shape.size(); ++d) flat = flat * whole_shape[d] + first[d] + at[d];
      values[v] = whole[static_cast<std::size_t>(flat)];
      for (std::size_t d = shape.size(); d-- > 0;) {  // next index, last axis fastest
        if (++at[d] < shape[d]) break;
        at[d] = 0;
      }
    }
  }

  std::vector<Tensor<T>> values_;  // router.weight, the shared expert's, then the routed experts'
  std::vector<bool> starts_at_zero_;  // [tensors]
  std::vector<Tensor<T>> gradients_;
  std::vector<std::vector<Index>> whole_;
  ExpertRange experts_, ffn_;  // this rank's slice: its experts, and its part of F
  std::size_t replicated_ = 1;      // leading tensors held whole on every rank
  std::size_t router_tensors_ = 1;  // of which the router's
};

}  // namespace moekit
