#pragma once
#include <atomic>
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

#include <moekit/layer/compose.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/core/gemm.hpp>
#include <moekit/core/detail/tiles.hpp>
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
    shape_ = {config.hidden, config.ffn, config.experts, top_k};
    parallel_.validate(shape_);  // first: over ranks, it agrees the shape before anything can throw
    parallel_.all_or_none([&] {
      require(config.experts >= 1, "moekit::MoELayer: experts = ", config.experts,
              "; expected at least 1");
      require(config.hidden >= 1, "moekit::MoELayer: hidden = ", config.hidden,
              "; expected at least 1");
      require(config.ffn >= 1, "moekit::MoELayer: ffn = ", config.ffn,
              "; expected at least 1");
      router_.validate(shape_);
      balancer_.validate(shape_);
      dispatcher_.validate(shape_);
      expert_.validate(shape_);
    });

    add_parameter({"router.weight", {shape_.experts, shape_.hidden}});
    for (auto& spec : X::parameters(local_shape(), parallel_.local_experts(shape_).count))
      add_parameter(std::move(spec));
    initialize(config.seed);
  }

  // ---- data path ----------------------------------------------------------------------------

  /// y = Σ_k weight_k · expert_k(x) for each token.                               [T,H] → [T,H]
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y) {
    parallel_.all_or_none([&] {
      check_matrix(x, "forward", "x", x.rows());
      require(y.rows() == x.rows() && y.cols() == shape_.hidden,
              "moekit::MoELayer::forward: y is [", y.rows(), ",", y.cols(),
              "]; expected [", x.rows(), ",", shape_.hidden, "] like x");
    });
    const Index tokens = x.rows(), hidden = shape_.hidden;
    have_forward_ = false;
    tokens_ = tokens;
    auto input = input_.matrix(tokens, hidden);
    auto scores = scores_.matrix(tokens, shape_.experts);
    workspace_.ready();
    detail::for_each_block(tokens, token_block, [&](Index first, Index n) {
      input.middleRows(first, n) = x.middleRows(first, n);  // kept for backward; also lets y alias x
      gemm(workspace_, scores.middleRows(first, n), input.middleRows(first, n),
                   router_weight().matrix().transpose());
    });
    workspace_.ready();
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
    if (plans_alone || parallel_.batch().size() == 1)
      dispatcher_.plan(routing_, shape_.experts, plan_);
    else
      plan_over_batch();
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
    detail::for_each_index(plan_.rows(), token_block, [&](Index r) {
      const Index choice = plan_.source[static_cast<std::size_t>(r)];
      if (choice == Plan::no_slot)
        rows.row(r).setZero();
      else
        rows.row(r) = input.row(choice / top_k);
    });
    auto out = expert_out_.matrix(plan_.rows(), hidden);
    if constexpr (P::moves_rows) {  // to the experts' ranks and back, chunk by chunk
      static_assert(RowMovingParallel<P>, "moekit::MoELayer: a Parallel with moves_rows = true must model "
                                          "moekit::RowMovingParallel; see docs/policies/parallel.md");
      parallel_.route(plan_.counts);
      auto remote = remote_rows_.matrix(parallel_.expert_rows(), hidden);
      auto remote_out = remote_out_.matrix(parallel_.expert_rows(), hidden);
      expert_saved_.resize(static_cast<std::size_t>(parallel_.chunks()));
      parallel_.template through_experts<T>(
          rows, remote, remote_out, out, [&](int chunk, Index first, std::span<const Index> offsets) {
            expert_.template forward<T>(expert_weights(), remote.middleRows(first, offsets.back()), offsets,
                                        remote_out.middleRows(first, offsets.back()),
                                        expert_saved_[static_cast<std::size_t>(chunk)], workspace_);
          });
    } else {
      expert_.template forward<T>(expert_weights(), rows, plan_.offsets, out, expert_saved_.front(), workspace_);
    }

    // y = Σ_k weight_k · out[slot_k]: the first term written, the others added; the next token's
    // rows fetched meanwhile.
    detail::for_each_index(tokens, token_block, [&](Index t) {
      if (t + 1 < tokens) fetch_rows_of(t + 1, out);
      auto row = y.row(t);
      bool written = false;
      for_each_kept_choice(t, [&](std::size_t choice, Index slot) {
        const T weight = routing_.weight[choice];
        if (written)
          row += weight * out.row(slot);
        else
          row = weight * out.row(slot);
        written = true;
      });
      if (!written) row.setZero();
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
  /// Σ(y ⊙ dy) + balance_loss(). One backward per forward: it overwrites what forward saved
  /// with gradients, so the step needs no second copy of the activations.
  void backward(ConstMatrixRef<T> dy, MatrixRef<T> dx) {
    parallel_.all_or_none([&] {
      require(have_forward_,
              "moekit::MoELayer::backward: no forward to go back through (backward consumes "
              "the last forward's saved activations); expected a call of forward(x) first");
      check_matrix(dy, "backward", "dy", tokens_);
      require(dx.rows() == tokens_ && dx.cols() == shape_.hidden,
              "moekit::MoELayer::backward: dx is [", dx.rows(), ",", dx.cols(),
              "]; expected [", tokens_, ",", shape_.hidden, "] like x");
    });
    const Index tokens = tokens_, hidden = shape_.hidden, count = plan_.rows();
    const auto input = input_.matrix(tokens, hidden);
    const auto scores = scores_.matrix(tokens, shape_.experts);

    // Combine: y_t = Σ_k w_tk · out_slot, so d_out_slot = w_tk · dy_t and d_w_tk = ⟨dy_t, out_slot⟩.
    // Each row of out is read once, then overwritten by its gradient.
    d_weight_.resize(static_cast<std::size_t>(routing_.choices()));
    std::fill(d_weight_.begin(), d_weight_.end(), T(0));
    auto d_out = expert_out_.matrix(count, hidden);
    detail::for_each_index(count, token_block, [&](Index r) {
      const Index choice = plan_.source[static_cast<std::size_t>(r)];
      if (choice == Plan::no_slot) {
        d_out.row(r).setZero();
        return;
      }
      const auto token = dy.row(choice / top_k);
      d_weight_[static_cast<std::size_t>(choice)] = token.dot(d_out.row(r));
      d_out.row(r) = routing_.weight[static_cast<std::size_t>(choice)] * token;
    });

    if constexpr (dispatcher_adjusts_weights)
      dispatcher_.template adjust_weights_backward<T>(plan_, raw_weight_, d_weight_);

    // The experts write d_rows over the rows they were given, which backward reads for the last
    // time there: no [S,H] buffer is added for it.
    auto d_rows = rows_.matrix(count, hidden);
    if constexpr (P::moves_rows) {  // the rows were sent; the experts' copies become d_rows and come back
      const Index received = parallel_.expert_rows();
      auto remote = remote_rows_.matrix(received, hidden);
      auto remote_d_out = remote_out_.matrix(received, hidden);  // the output is no longer needed
      parallel_.template through_experts<T>(
          d_out, remote_d_out, remote, d_rows, [&](int chunk, Index first, std::span<const Index> offsets) {
            const Index n = offsets.back();
            expert_.template backward<T>(expert_weights(), remote.middleRows(first, n), offsets,
                                         expert_saved_[static_cast<std::size_t>(chunk)],
                                         remote_d_out.middleRows(first, n), expert_gradients(), workspace_);
          });
    } else {
      expert_.template backward<T>(expert_weights(), d_rows, plan_.offsets, expert_saved_.front(), d_out,
                                   expert_gradients(), workspace_);
    }

    auto d_logits = d_logits_.matrix(tokens, shape_.experts);
    router_.template backward<T>(scores, routing_, d_weight_, d_logits);
    balancer_.template backward<T>(scores, balance_context(), balance_state_, d_logits);

    // dy is read for the last time above, so dx may alias it.
    workspace_.ready();
    detail::for_each_block(tokens, token_block, [&](Index first, Index n) {
      gemm(workspace_, dx.middleRows(first, n), d_logits.middleRows(first, n), router_weight().matrix());
      for (Index t = first; t < first + n; ++t) {
        if (t + 1 < tokens) fetch_rows_of(t + 1, d_rows);
        for_each_kept_choice(t, [&](std::size_t, Index slot) { dx.row(t) += d_rows.row(slot); });
      }
    });
    // The router's gradient, d_logitsᵀ · x, by blocks of H columns: each sums over all tokens.
    auto d_router = gradients_.front().matrix();
    detail::for_each_block(hidden, hidden_block, [&](Index first, Index n) {
      gemm_add(workspace_, d_router.middleCols(first, n), d_logits.transpose(), input.middleCols(first, n));
    });
    workspace_.ready();
    have_forward_ = false;  // the saved activations now hold gradients
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

  /// Over ranks, after the last backward of a step and before the optimizer: gradients become
  /// those of J = (1/D)·Σ_r J_r over the D token shards of the batch group (the router's averaged,
  /// the experts' summed over their replicas and divided by D). In one process, nothing to do.
  /// docs/distributed.md#gradients
  void reduce_gradients() {
    parallel_.template reduce_gradients<T>(std::span<Tensor<T>>(gradients_).first(1), expert_gradients());
  }

  /// Fresh parameters, as torch's Linear draws them: U(±1/√fan_in), fan_in = the last dim. The
  /// values are drawn for the whole layer and this rank keeps its slice, so a layer split over
  /// ranks starts where one process would.
  void initialize(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const auto whole = whole_shapes();
    std::vector<T> values;
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(whole[i].back()));
      std::uniform_real_distribution<double> draw(-bound, bound);
      values.resize(static_cast<std::size_t>(element_count(whole[i])));
      for (T& v : values) v = static_cast<T>(draw(rng));
      take_slice(values, whole[i], parameters_[i]);
    }
    zero_grad();
  }

  /// Sets every parameter from the whole layer's values (as one process holds them; same
  /// names and order as parameters()): a rank keeps its own slice.
  void assign_whole(std::span<const Tensor<T>> whole) {
    const auto shapes = whole_shapes();
    require(whole.size() == parameters_.size(), "moekit::MoELayer::assign_whole: ", whole.size(),
            " tensors; expected ", parameters_.size(), " like parameters()");
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      require(whole[i].name() == parameters_[i].name() && whole[i].shape() == shapes[i],
              "moekit::MoELayer::assign_whole: tensor ", i, " is '", whole[i].name(), "' ",
              shape_string(whole[i].shape()), "; expected '", parameters_[i].name(), "' ",
              shape_string(shapes[i]));
      take_slice(whole[i].values(), shapes[i], parameters_[i]);
    }
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

  /// Writes every parameter under its name, in this layer's scalar type. Over ranks, each rank
  /// writes its own slices (to its own path).
  void save(const std::filesystem::path& path) const {
    io::SafeTensors file;
    file.metadata() = {{"format", "moekit"},
                       {"layer", name()},
                       {"hidden", std::to_string(shape_.hidden)},
                       {"ffn", std::to_string(shape_.ffn)},
                       {"experts", std::to_string(shape_.experts)},
                       {"topk", std::to_string(top_k)}};
    for (const auto& p : parameters_) file.add(p.name(), p.shape(), p.values());
    if constexpr (SavesState<B, T>) {
      if (const auto state = balancer_.saved(balance_state_); !state.empty())
        file.add<double>(std::string(B::saved_name), {shape_.experts}, state);
    }
    file.write(path);
  }

  /// Reads every parameter by name from a safetensors file (F32 or F64; other tensors in the
  /// file are ignored). All are checked before any is changed. A tensor of the whole layer's
  /// shape gives this rank its slice, so a single-process checkpoint loads at any EP degree.
  void load(const std::filesystem::path& path) {
    const auto file = io::SafeTensors::read(path);
    const auto whole = whole_shapes();
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      require(file.contains(p.name()), "moekit::MoELayer::load: '", path.string(),
              "' has no tensor '", p.name(), "'; expected one of shape ",
              shape_string(p.shape()));
      const auto& info = file.info(p.name());
      require(info.shape == p.shape() || info.shape == whole[i], "moekit::MoELayer::load: '",
              path.string(), "' tensor '", p.name(), "' is ", shape_string(info.shape),
              "; expected ", shape_string(p.shape()),
              whole[i] == p.shape() ? "" : " (this rank's slice) or " + shape_string(whole[i]) + " (the whole layer)");
      require(info.dtype == io::DType::f32 || info.dtype == io::DType::f64,
              "moekit::MoELayer::load: '", path.string(), "' tensor '", p.name(),
              "' is ", io::to_string(info.dtype), "; expected F32 or F64");
    }
    if constexpr (SavesState<B, T>) {
      const std::string name(B::saved_name);
      if (file.contains(name))
        require(file.info(name).shape == std::vector<Index>{shape_.experts}, "moekit::MoELayer::load: '",
                path.string(), "' tensor '", name, "' is ", shape_string(file.info(name).shape), "; expected [",
                shape_.experts, "]");
    }
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      auto& p = parameters_[i];
      const auto values = file.values<T>(p.name());
      if (file.info(p.name()).shape == p.shape())
        std::copy(values.begin(), values.end(), p.values().begin());
      else
        take_slice(values, whole[i], p);
    }
    if constexpr (SavesState<B, T>) {
      if (file.contains(std::string(B::saved_name)))
        balancer_.restore(file.values<double>(std::string(B::saved_name)), balance_state_);
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
  /// Dispatchers that decide each choice on its own (Dropless) can plan each rank's tokens alone.
  static constexpr bool plans_alone = [] {
    if constexpr (requires { D::decides_each_choice_alone; }) return D::decides_each_choice_alone;
    else return false;
  }();

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
    fail("moekit::MoELayer: no parameter named '", name, "'; expected one of ", known);
  }

  const Tensor<T>& router_weight() const { return parameters_.front(); }
  std::span<const Tensor<T>> expert_weights() const {
    return std::span<const Tensor<T>>(parameters_).subspan(1);
  }
  std::span<Tensor<T>> expert_gradients() { return std::span<Tensor<T>>(gradients_).subspan(1); }

  /// The shape the expert policy sizes this rank's parameters by: its slice of F.
  LayerShape local_shape() const {
    LayerShape s = shape_;
    s.ffn = parallel_.local_ffn(shape_).count;
    return s;
  }
  /// Every parameter's shape in the whole layer (one process), in parameters() order.
  std::vector<std::vector<Index>> whole_shapes() const {
    std::vector<std::vector<Index>> shapes{{shape_.experts, shape_.hidden}};
    for (auto& spec : X::parameters(shape_, shape_.experts)) shapes.push_back(spec.shape);
    return shapes;
  }
  static Index element_count(const std::vector<Index>& shape) {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
  /// This rank's slice of a whole-layer tensor: along the first axis its experts (when the
  /// shapes differ there), along any other axis that differs its slice of F.
  void take_slice(std::span<const T> whole, const std::vector<Index>& whole_shape, Tensor<T>& local) const {
    const auto& shape = local.shape();
    std::vector<Index> first(shape.size(), 0);
    for (std::size_t d = 0; d < shape.size(); ++d)
      if (shape[d] != whole_shape[d])
        first[d] = d == 0 ? parallel_.local_experts(shape_).first : parallel_.local_ffn(shape_).first;
    auto values = local.values();
    std::vector<Index> at(shape.size(), 0);
    for (std::size_t i = 0; i < values.size(); ++i) {
      Index flat = 0;
      for (std::size_t d = 0; d < shape.size(); ++d) flat = flat * whole_shape[d] + first[d] + at[d];
      values[i] = whole[static_cast<std::size_t>(flat)];
      for (std::size_t d = shape.size(); d-- > 0;) {  // next index, last axis fastest
        if (++at[d] < shape[d]) break;
        at[d] = 0;
      }
    }
  }

  /// Prefetches the rows of m, in the experts' order, that token t's choices went to: for the loops
  /// that sum each token's rows, which lie in its experts' blocks, where the hardware's prefetcher
  /// cannot guess them (docs/kernels.md#combine).
  template <class M>
  void fetch_rows_of(Index t, const M& m) const {
    for_each_kept_choice(t, [&](std::size_t, Index slot) {
      const char* line = reinterpret_cast<const char*>(m.row(slot).data());
      for (Index b = 0; b < m.cols() * Index{sizeof(T)}; b += 64) __builtin_prefetch(line + b);
    });
  }

  /// body(choice, slot) for each of token t's choices that the plan kept, in order: its index in
  /// the routing (t·K + k) and its row in the experts' blocks.
  template <class Body>
  void for_each_kept_choice(Index t, Body body) const {
    for (int k = 0; k < top_k; ++k) {
      const auto choice = static_cast<std::size_t>(t * top_k + k);
      if (const Index slot = plan_.slot[choice]; slot != Plan::no_slot) body(choice, slot);
    }
  }

  /// Over ranks, for a dispatcher whose decisions depend on the whole batch (a capacity): plans
  /// the gathered routing of every rank, exactly as one process would, and keeps this rank's
  /// kept choices, in token order within each expert's block.
  void plan_over_batch() {
    const BatchGroup& batch = parallel_.batch();
    const auto choices = static_cast<std::size_t>(routing_.choices());
    packed_.resize(2 * choices);
    for (std::size_t c = 0; c < choices; ++c) {
      packed_[2 * c] = double(routing_.index[c]);
      packed_[2 * c + 1] = double(routing_.weight[c]);
    }
    batch.gather(packed_, gathered_, gathered_counts_);
    Index before = 0;
    for (int r = 0; r < batch.rank(); ++r) before += gathered_counts_[static_cast<std::size_t>(r)] / 2;
    const auto all = gathered_.size() / 2;
    batch_routing_.resize(static_cast<Index>(all) / top_k, top_k);
    for (std::size_t c = 0; c < all; ++c) {
      batch_routing_.index[c] = static_cast<Index>(gathered_[2 * c]);
      batch_routing_.weight[c] = static_cast<T>(gathered_[2 * c + 1]);
    }
    dispatcher_.plan(batch_routing_, shape_.experts, batch_plan_);

    plan_.reset(routing_.tokens, shape_.experts, top_k);
    plan_.place(routing_.index, [&](std::size_t c) {
      return batch_plan_.slot[static_cast<std::size_t>(before) + c] != Plan::no_slot;
    });
  }

  BalanceContext balance_context() const { return {router_.score_function(), top_k, &parallel_.batch()}; }

  void check_matrix(ConstMatrixRef<T> m, std::string_view call, std::string_view what,
                    Index rows) const {
    require(m.cols() == shape_.hidden && m.rows() == rows, "moekit::MoELayer::", call,
            ": ", what, " is [", m.rows(), ",", m.cols(), "]; expected [", rows, ",",
            shape_.hidden, "] (tokens × hidden)");
    if (!config_.check_finite || all_finite(m)) return;
    for (Index t = 0; t < m.rows(); ++t)
      for (Index h = 0; h < m.cols(); ++h)
        if (!std::isfinite(m(t, h)))
          fail("moekit::MoELayer::", call, ": ", what, "[", t, ",", h, "] is ", m(t, h),
               "; expected finite values (LayerConfig::check_finite = false skips this check)");
  }

  /// Whether every element is finite. 0·v is 0 for finite v and NaN otherwise, and a sum with a
  /// NaN term is NaN: a vectorised sum per block of rows, in parallel (Eigen's allFinite is neither).
  static bool all_finite(ConstMatrixRef<T> m) {
    std::atomic<bool> finite{true};
    detail::for_each_block(m.rows(), token_block, [&](Index first, Index n) {
      if (!((m.middleRows(first, n).array() * T(0)).sum() == T(0))) finite = false;
    });
    return finite;
  }

  // Blocks of the router's products; fixed sizes keep every sum in the same order on any thread count.
  static constexpr Index token_block = 256, hidden_block = 256;

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
  std::vector<typename X::template Saved<T>> expert_saved_ = std::vector<typename X::template Saved<T>>(1);  // one per chunk
  detail::Buffer<T> input_, scores_, rows_, expert_out_;  // [T,H] [T,E] [S,H] [S,H] (backward: d_rows, d_out)
  detail::Buffer<T> selection_;                           // [T,E] what the balancer selects on
  detail::Buffer<T> d_logits_;                            // [T,E]
  std::vector<T> d_weight_;                               // [T,K]
  Workspace<T> workspace_;                                // packing buffers of all the layer's GEMMs
  std::vector<Index> load_;                               // [E] kept choices per expert
  std::vector<T> raw_weight_;                             // [T,K] weights before the dispatcher adjusts them
  detail::Buffer<T> remote_rows_, remote_out_;  // [R,H] rows at this rank's experts (backward: d_rows, d_out)
  std::vector<double> packed_, gathered_;                 // the batch's routing, for plan_over_batch
  std::vector<Index> gathered_counts_;
  Routing<T> batch_routing_;
  Plan batch_plan_;
  std::function<void(const RoutingStats&)> observer_;
};

}  // namespace moekit
