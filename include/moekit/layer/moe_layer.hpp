#pragma once
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/core/compose.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>
#include <moekit/io/safetensors.hpp>
#include <moekit/layer/routing_stats.hpp>

namespace moekit {

namespace detail {

/// "TopK2", "GroupedGemmSwiGLU": a policy's name with its compile-time arguments.
template <class P>
std::string policy_label() {
  std::string label(P::name);
  if constexpr (requires { P::top_k; }) label += std::to_string(P::top_k);
  if constexpr (requires { typename P::activation; }) label += P::activation::name;
  return label;
}

}  // namespace detail

/// The MoE layer. Users name it through MoELayer<Ps...>, which puts the policies in this order.
/// docs/getting_started.md
///
/// forward(x) routes, dispatches, runs the experts and combines; backward(dy) returns dx and
/// adds the gradients of every parameter (and of the balancer's loss) into gradients().
template <Scalar T, Router R, Balancer B, Dispatcher D, Expert X, Parallel P>
class BasicMoELayer {
 public:
  using scalar_type = T;
  using router_type = R;
  using balancer_type = B;
  using dispatcher_type = D;
  using expert_type = X;
  using parallel_type = P;
  static constexpr int top_k = R::top_k;

  /// Policies, in any order, replace the default-constructed ones: Layer(config, TopK<2>{{...}}).
  template <class... Policies>
  explicit BasicMoELayer(const LayerConfig& config, const Policies&... policies) : config_(config) {
    static_assert((is_own_policy<Policies> && ...),
                  "moekit::MoELayer: a constructor argument is not one of this layer's policy "
                  "types; pass policies of the types named in MoELayer<...>");
    (set_policy(policies), ...);
    detail::require(config.experts >= 1, "moekit::MoELayer: experts = ", config.experts,
                    "; expected at least 1");
    detail::require(config.hidden >= 1, "moekit::MoELayer: hidden = ", config.hidden,
                    "; expected at least 1");
    detail::require(config.ffn >= 1, "moekit::MoELayer: ffn = ", config.ffn,
                    "; expected at least 1");
    shape_ = {config.hidden, config.ffn, config.experts, top_k};
    router_.validate(shape_);
    balancer_.validate(shape_);
    dispatcher_.validate(shape_);
    expert_.validate(shape_);
    parallel_.validate(shape_);

    add_parameter({"router.weight", {shape_.experts, shape_.hidden}});
    for (auto& spec : X::parameters(shape_, parallel_.local_experts(shape_).count))
      add_parameter(std::move(spec));
    initialize(config.seed);
  }

  // ---- data path ----------------------------------------------------------------------------

  /// y = Σ_k weight_k · expert_k(x) for each token.                               [T,H] → [T,H]
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y) {
    check_matrix(x, "forward", "x", x.rows());
    detail::require(y.rows() == x.rows() && y.cols() == shape_.hidden,
                    "moekit::MoELayer::forward: y is [", y.rows(), ",", y.cols(),
                    "]; expected [", x.rows(), ",", shape_.hidden, "] like x");
    const Index tokens = x.rows(), hidden = shape_.hidden;
    have_forward_ = false;
    tokens_ = tokens;
    auto input = input_.matrix(tokens, hidden);
    input = x;  // kept for backward; also lets y alias x

    auto scores = scores_.matrix(tokens, shape_.experts);
    scores.noalias() = input * router_weight().matrix().transpose();
    auto selection = selection_.matrix(balancer_selects ? tokens : 0, shape_.experts);
    if constexpr (balancer_selects) selection = scores;  // the logits, for Sinkhorn
    router_.template score<T>(scores);
    if constexpr (balancer_selects) {  // the balancer shapes selection, never the weights
      balancer_.template select<T>(scores, balance_context(), balance_state_, selection);
      router_.template select<T>(selection, scores, routing_);
    } else {
      router_.template select<T>(scores, scores, routing_);
    }
    balance_loss_ = balancer_.template forward<T>(scores, balance_context(), balance_state_);
    dispatcher_.plan(routing_, shape_.experts, plan_);
    load_.assign(static_cast<std::size_t>(shape_.experts), 0);
    for (Index choice = 0; choice < routing_.choices(); ++choice)
      if (plan_.slot[static_cast<std::size_t>(choice)] != Plan::no_slot)
        ++load_[static_cast<std::size_t>(routing_.index[static_cast<std::size_t>(choice)])];
    if constexpr (balancer_counts_load) balancer_.template routed<T>(load_, balance_state_);
    if constexpr (dispatcher_adjusts_weights) {  // e.g. renormalising after drops
      raw_weight_.assign(routing_.weight.begin(), routing_.weight.end());
      dispatcher_.template adjust_weights<T>(plan_, routing_);
    }

    auto rows = rows_.matrix(plan_.rows(), hidden);
    for_blocks(plan_.rows(), [&](Index r) {
      const Index choice = plan_.source[static_cast<std::size_t>(r)];
      if (choice == Plan::no_slot)
        rows.row(r).setZero();
      else
        rows.row(r) = input.row(choice / top_k);
    });
    auto out = expert_out_.matrix(plan_.rows(), hidden);
    expert_.template forward<T>(expert_weights(), rows, plan_.offsets, out, expert_saved_);

    for_blocks(tokens, [&](Index t) {
      y.row(t).setZero();
      for (int k = 0; k < top_k; ++k) {
        const auto choice = static_cast<std::size_t>(t * top_k + k);
        if (plan_.slot[choice] != Plan::no_slot)
          y.row(t) += routing_.weight[choice] * out.row(plan_.slot[choice]);
      }
    });
    have_forward_ = true;
    if (observer_) observer_(stats());
  }

  Matrix<T> forward(ConstMatrixRef<T> x) {
    Matrix<T> y(x.rows(), shape_.hidden);
    forward(x, y);
    return y;
  }

  /// dx from dy, for the last forward; adds every parameter's gradient.          [T,H] → [T,H]
  /// The balancer's loss counts with weight 1, so the gradients are those of
  /// Σ(y ⊙ dy) + balance_loss().
  void backward(ConstMatrixRef<T> dy, MatrixRef<T> dx) {
    detail::require(have_forward_,
                    "moekit::MoELayer::backward: no forward to go back through; expected a call "
                    "of forward(x) first");
    check_matrix(dy, "backward", "dy", tokens_);
    detail::require(dx.rows() == tokens_ && dx.cols() == shape_.hidden,
                    "moekit::MoELayer::backward: dx is [", dx.rows(), ",", dx.cols(),
                    "]; expected [", tokens_, ",", shape_.hidden, "] like x");
    const Index tokens = tokens_, hidden = shape_.hidden, count = plan_.rows();
    const auto input = input_.matrix(tokens, hidden);
    const auto scores = scores_.matrix(tokens, shape_.experts);
    const auto rows = rows_.matrix(count, hidden);
    const auto out = expert_out_.matrix(count, hidden);

    // Combine: y_t = Σ_k w_tk · out_slot, so d_out_slot = w_tk · dy_t and d_w_tk = ⟨dy_t, out_slot⟩.
    d_weight_.resize(static_cast<std::size_t>(routing_.choices()));
    std::fill(d_weight_.begin(), d_weight_.end(), T(0));
    auto d_out = d_out_.matrix(count, hidden);
    for_blocks(count, [&](Index r) {
      const Index choice = plan_.source[static_cast<std::size_t>(r)];
      if (choice == Plan::no_slot) {
        d_out.row(r).setZero();
        return;
      }
      const auto token = dy.row(choice / top_k);
      d_weight_[static_cast<std::size_t>(choice)] = token.dot(out.row(r));
      d_out.row(r) = routing_.weight[static_cast<std::size_t>(choice)] * token;
    });

    if constexpr (dispatcher_adjusts_weights)
      dispatcher_.template adjust_weights_backward<T>(plan_, raw_weight_, d_weight_);

    auto d_rows = d_rows_.matrix(count, hidden);
    expert_.template backward<T>(expert_weights(), rows, plan_.offsets, expert_saved_, d_out, d_rows,
                     expert_gradients());

    auto d_logits = d_logits_.matrix(tokens, shape_.experts);
    router_.template backward<T>(scores, routing_, d_weight_, d_logits);
    balancer_.template backward<T>(scores, balance_context(), balance_state_, d_logits);

    // dy is read for the last time above, so dx may alias it.
    for_blocks(tokens, [&](Index t) {
      dx.row(t) = d_logits.row(t) * router_weight().matrix();
      for (int k = 0; k < top_k; ++k) {
        const Index slot = plan_.slot[static_cast<std::size_t>(t * top_k + k)];
        if (slot != Plan::no_slot) dx.row(t) += d_rows.row(slot);
      }
    });
    gradients_.front().matrix().noalias() += d_logits.transpose() * input;
  }

  Matrix<T> backward(ConstMatrixRef<T> dy) {
    Matrix<T> dx(dy.rows(), shape_.hidden);
    backward(dy, dx);
    return dx;
  }

  // ---- parameters, by name; gradients mirror them one to one --------------------------------

  std::span<Tensor<T>> parameters() { return parameters_; }
  std::span<const Tensor<T>> parameters() const { return parameters_; }
  std::span<Tensor<T>> gradients() { return gradients_; }
  std::span<const Tensor<T>> gradients() const { return gradients_; }
  Tensor<T>& parameter(std::string_view name) { return find(parameters_, name); }
  const Tensor<T>& parameter(std::string_view name) const { return find(parameters_, name); }
  Tensor<T>& gradient(std::string_view name) { return find(gradients_, name); }
  const Tensor<T>& gradient(std::string_view name) const { return find(gradients_, name); }

  void zero_grad() {
    for (auto& g : gradients_) g.set_zero();
  }

  /// Fresh parameters, as torch's Linear draws them: U(±1/√fan_in), fan_in = the last dim.
  void initialize(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (auto& p : parameters_) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p.shape().back()));
      std::uniform_real_distribution<double> draw(-bound, bound);
      for (T& v : p.values()) v = static_cast<T>(draw(rng));
    }
    zero_grad();
  }

  // ---- what the last forward decided --------------------------------------------------------

  const Routing<T>& routing() const { return routing_; }
  const Plan& plan() const { return plan_; }
  /// Kept choices per expert in the last forward (padding rows not counted).
  std::span<const Index> tokens_per_expert() const { return load_; }
  /// Load statistics of the last forward: per-expert tokens, drops, max/mean, balancer terms.
  RoutingStats stats() const {
    RoutingStats s = RoutingStats::from(plan_, load_);
    s.balance_terms.emplace_back(std::string(B::name), static_cast<double>(balance_loss_));
    return s;
  }
  /// Marks a step boundary (after the optimizer step): balancers that adapt between steps, such
  /// as AuxFree's bias, update here. Does nothing for the others.
  void end_step() {
    if constexpr (requires { balancer_.template step<T>(balance_context(), balance_state_); })
      balancer_.template step<T>(balance_context(), balance_state_);
  }

  /// The balancer's state (AuxFree: its bias and counts).
  const typename B::template State<T>& balance_state() const { return balance_state_; }

  /// Calls `observer(stats())` after every forward, e.g. a JsonLinesLogger; {} detaches.
  void observe(std::function<void(const RoutingStats&)> observer) { observer_ = std::move(observer); }
  /// The balancer's loss (coefficient included) for the last forward.
  T balance_loss() const { return balance_loss_; }

  // ---- policies and shape -------------------------------------------------------------------

  const LayerShape& shape() const { return shape_; }
  const LayerConfig& config() const { return config_; }
  R& router() { return router_; }
  const R& router() const { return router_; }
  B& balancer() { return balancer_; }
  const B& balancer() const { return balancer_; }
  D& dispatcher() { return dispatcher_; }
  const D& dispatcher() const { return dispatcher_; }
  X& expert() { return expert_; }
  const X& expert() const { return expert_; }
  P& parallel() { return parallel_; }
  const P& parallel() const { return parallel_; }

  /// "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f32"
  static std::string name() {
    return detail::policy_label<R>() + "_" + detail::policy_label<B>() + "_" +
           detail::policy_label<D>() + "_" + detail::policy_label<X>() + "_" +
           detail::policy_label<P>() + "_" + std::string(scalar_name<T>);
  }

  // ---- safetensors --------------------------------------------------------------------------

  /// Writes every parameter under its name, in this layer's scalar type.
  void save(const std::filesystem::path& path) const {
    io::SafeTensors file;
    file.metadata() = {{"format", "moekit"},
                       {"layer", name()},
                       {"hidden", std::to_string(shape_.hidden)},
                       {"ffn", std::to_string(shape_.ffn)},
                       {"experts", std::to_string(shape_.experts)},
                       {"topk", std::to_string(top_k)}};
    for (const auto& p : parameters_) file.add(p.name(), p.shape(), p.values());
    if constexpr (has_bias_state) {
      if (!balance_state_.bias.empty())
        file.add<double>("router.bias", {shape_.experts}, balance_state_.bias);
    }
    file.write(path);
  }

  /// Reads every parameter by name from a safetensors file (F32 or F64; other tensors in the
  /// file are ignored). All are checked before any is changed.
  void load(const std::filesystem::path& path) {
    const auto file = io::SafeTensors::read(path);
    for (const auto& p : parameters_) {
      detail::require(file.contains(p.name()), "moekit::MoELayer::load: '", path.string(),
                      "' has no tensor '", p.name(), "'; expected one of shape ",
                      shape_string(p.shape()));
      const auto& info = file.info(p.name());
      detail::require(info.shape == p.shape(), "moekit::MoELayer::load: '", path.string(),
                      "' tensor '", p.name(), "' is ", shape_string(info.shape), "; expected ",
                      shape_string(p.shape()));
      detail::require(info.dtype == io::DType::f32 || info.dtype == io::DType::f64,
                      "moekit::MoELayer::load: '", path.string(), "' tensor '", p.name(),
                      "' is ", io::to_string(info.dtype), "; expected F32 or F64");
    }
    if constexpr (has_bias_state) {
      if (file.contains("router.bias"))
        detail::require(file.info("router.bias").shape == std::vector<Index>{shape_.experts},
                        "moekit::MoELayer::load: '", path.string(), "' tensor 'router.bias' is ",
                        shape_string(file.info("router.bias").shape), "; expected [", shape_.experts, "]");
    }
    for (auto& p : parameters_) {
      const auto values = file.values<T>(p.name());
      std::copy(values.begin(), values.end(), p.values().begin());
    }
    if constexpr (has_bias_state) {
      if (file.contains("router.bias")) {
        balance_state_.bias = file.values<double>("router.bias");
        balance_state_.counts.assign(static_cast<std::size_t>(shape_.experts), 0);
      }
    }
  }

 private:
  template <class Q>
  static constexpr bool is_own_policy = std::is_same_v<Q, R> || std::is_same_v<Q, B> ||
                                        std::is_same_v<Q, D> || std::is_same_v<Q, X> ||
                                        std::is_same_v<Q, P>;
  static constexpr bool balancer_selects =
      requires(const B& b, ConstMatrixRef<T> scores, const BalanceContext& context,
               typename B::template State<T>& state, MatrixRef<T> selection) {
        b.template select<T>(scores, context, state, selection);
      };
  static constexpr bool balancer_counts_load =
      requires(const B& b, std::span<const Index> load, typename B::template State<T>& state) {
        b.template routed<T>(load, state);
      };
  static constexpr bool dispatcher_adjusts_weights =
      requires(const D& d, const Plan& plan, Routing<T>& routing, std::span<const T> w, std::span<T> dw) {
        d.template adjust_weights<T>(plan, routing);
        d.template adjust_weights_backward<T>(plan, w, dw);
      };
  static constexpr bool has_bias_state =
      requires(typename B::template State<T>& state) { state.bias; };

  void set_policy(const R& r) { router_ = r; }
  void set_policy(const B& b) { balancer_ = b; }
  void set_policy(const D& d) { dispatcher_ = d; }
  void set_policy(const X& x) { expert_ = x; }
  void set_policy(const P& p) { parallel_ = p; }

  void add_parameter(ParameterSpec spec) {
    parameters_.emplace_back(spec.name, spec.shape);
    gradients_.emplace_back(std::move(spec.name), std::move(spec.shape));
  }

  static auto& find(auto& tensors, std::string_view name) {
    for (auto& t : tensors)
      if (t.name() == name) return t;
    std::string known;
    for (const auto& t : tensors) known += (known.empty() ? "" : ", ") + t.name();
    detail::fail("moekit::MoELayer: no parameter named '", name, "'; expected one of ", known);
  }

  const Tensor<T>& router_weight() const { return parameters_.front(); }
  std::span<const Tensor<T>> expert_weights() const {
    return std::span<const Tensor<T>>(parameters_).subspan(1);
  }
  std::span<Tensor<T>> expert_gradients() { return std::span<Tensor<T>>(gradients_).subspan(1); }

  BalanceContext balance_context() const { return {router_.score_function(), top_k}; }

  void check_matrix(ConstMatrixRef<T> m, std::string_view call, std::string_view what,
                    Index rows) const {
    detail::require(m.cols() == shape_.hidden && m.rows() == rows, "moekit::MoELayer::", call,
                    ": ", what, " is [", m.rows(), ",", m.cols(), "]; expected [", rows, ",",
                    shape_.hidden, "] (tokens × hidden)");
    if (!config_.check_finite || m.allFinite()) return;
    for (Index t = 0; t < m.rows(); ++t)
      for (Index h = 0; h < m.cols(); ++h)
        if (!std::isfinite(m(t, h)))
          detail::fail("moekit::MoELayer::", call, ": ", what, "[", t, ",", h, "] is ", m(t, h),
                       "; expected finite values (LayerConfig::check_finite = false skips this check)");
  }

  /// body(i) for i in [0, n), in parallel; each i writes only its own row.
  template <class Body>
  static void for_blocks(Index n, Body body) {
    tbb::parallel_for(tbb::blocked_range<Index>(0, n, 256), [&](const tbb::blocked_range<Index>& r) {
      for (Index i = r.begin(); i != r.end(); ++i) body(i);
    });
  }

  LayerConfig config_;
  LayerShape shape_;
  R router_{};
  B balancer_{};
  D dispatcher_{};
  X expert_{};
  P parallel_{};
  std::vector<Tensor<T>> parameters_;  // router.weight, then the expert's
  std::vector<Tensor<T>> gradients_;

  // Saved by forward for backward; buffers grow to the largest batch and are reused.
  bool have_forward_ = false;
  Index tokens_ = 0;
  Routing<T> routing_;
  Plan plan_;
  T balance_loss_ = 0;
  typename B::template State<T> balance_state_;
  typename X::template Saved<T> expert_saved_;
  detail::Buffer<T> input_, scores_, rows_, expert_out_;  // [T,H] [T,E] [S,H] [S,H]
  detail::Buffer<T> selection_;                           // [T,E] what the balancer selects on
  detail::Buffer<T> d_out_, d_rows_, d_logits_;           // [S,H] [S,H] [T,E]
  std::vector<T> d_weight_;                               // [T,K]
  std::vector<Index> load_;                               // [E] kept choices per expert
  std::vector<T> raw_weight_;                             // [T,K] weights before the dispatcher adjusts them
  std::function<void(const RoutingStats&)> observer_;
};

}  // namespace moekit
