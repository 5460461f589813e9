#pragma once
// The limit a layer's experts are held to (docs/performance.md#limit): SwiGLU over the routed rows
// with one expert's weights — no router, no gather, no combine — computed with the best dense GEMM
// the build has. With oneDNN (a benchmark-only dependency, found by benchmarks/CMakeLists.txt)
// that is oneDNN's matmul, the weights packed once into its own layout; without it, Eigen's GEMM
// on equal panels per thread, and the benchmarks say so (limit_label). Used by layer_benchmark
// and by moekit-hf bench.
#include <map>
#include <optional>
#include <string>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/moekit.hpp>

#ifdef MOEKIT_ONEDNN_LIMIT
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace probes {

/// What either limit computes with: rows x [rows,H] and dy, one expert's weights and their
/// gradients, and the products' outputs.
class LimitOperands {
 public:
  using Index = moekit::Index;
  using Matrix = moekit::Matrix<float>;

  LimitOperands(Index rows, Index hidden, Index ffn)
      : x_(Matrix::Random(rows, hidden)), dy_(Matrix::Random(rows, hidden)),
        gate_(Matrix::Random(ffn, hidden)), up_(Matrix::Random(ffn, hidden)), down_(Matrix::Random(hidden, ffn)),
        d_gate_w_(Matrix::Zero(ffn, hidden)), d_up_w_(Matrix::Zero(ffn, hidden)), d_down_w_(Matrix::Zero(hidden, ffn)),
        g_(rows, ffn), u_(rows, ffn), h_(rows, ffn), y_(rows, hidden), dx_(rows, hidden) {}

  /// The results: y after forward; dx and the weights' gradients (summed over the backward
  /// passes run) after backward.
  const Matrix& y() const { return y_; }
  const Matrix& dx() const { return dx_; }
  const Matrix& d_gate_weight() const { return d_gate_w_; }
  const Matrix& d_up_weight() const { return d_up_w_; }
  const Matrix& d_down_weight() const { return d_down_w_; }

 protected:
  Matrix x_, dy_, gate_, up_, down_, d_gate_w_, d_up_w_, d_down_w_, g_, u_, h_, y_, dx_;
};

/// Eigen's GEMM: each thread takes an equal panel (rows for forward and dx, FFN columns for the
/// weight gradients), the fastest way to run Eigen's single-threaded GEMM on several threads.
class EigenLimit : public LimitOperands {
 public:
  /// Float products whatever the layer's precision: Eigen has no bf16 or int8 GEMM worth a limit.
  EigenLimit(Index rows, Index hidden, Index ffn, moekit::Precision = moekit::Precision::scalar)
      : LimitOperands(rows, hidden, ffn) {}

  void forward(int threads) {
    panels(threads, x_.rows(), [&](Index first, Index n) {
      const auto x = x_.middleRows(first, n);
      auto g = g_.middleRows(first, n), u = u_.middleRows(first, n), h = h_.middleRows(first, n);
      g.noalias() = x * gate_.transpose();
      u.noalias() = x * up_.transpose();
      moekit::detail::activate_gated<moekit::SwiGLU>(g, u, h);  // the layer's own pass: only the GEMMs differ
      y_.middleRows(first, n).noalias() = h * down_.transpose();
    });
  }

  void backward(int threads) {
    panels(threads, h_.cols(), [&](Index first, Index n) {  // d_down = dyᵀ · h
      d_down_w_.middleCols(first, n).noalias() += dy_.transpose() * h_.middleCols(first, n);
    });
    panels(threads, x_.rows(), [&](Index first, Index n) {
      auto g = g_.middleRows(first, n), u = u_.middleRows(first, n), dh = h_.middleRows(first, n);
      dh.noalias() = dy_.middleRows(first, n) * down_;
      moekit::detail::activate_gated_backward<moekit::SwiGLU>(g, u, dh);
      auto dx = dx_.middleRows(first, n);
      dx.noalias() = g * gate_;
      dx.noalias() += u * up_;
    });
    panels(threads, g_.cols(), [&](Index first, Index n) {
      d_gate_w_.middleRows(first, n).noalias() += g_.middleCols(first, n).transpose() * x_;
      d_up_w_.middleRows(first, n).noalias() += u_.middleCols(first, n).transpose() * x_;
    });
  }

 private:
  template <class Body>
  static void panels(int threads, Index extent, Body body) {
    tbb::parallel_for(tbb::blocked_range<int>(0, threads, 1), [&](const tbb::blocked_range<int>& r) {
      for (int p = r.begin(); p != r.end(); ++p) {
        const Index first = extent * p / threads, last = extent * (p + 1) / threads;
        if (last > first) body(first, last - first);
      }
    }, tbb::simple_partitioner());
  }
};

#ifdef MOEKIT_ONEDNN_LIMIT

/// oneDNN's matmul for each of the nine products, on oneDNN's own (OpenMP) threads; the
/// activation passes are moekit's, on the same threads. Forward: g = x·W_gᵀ, u = x·W_uᵀ,
/// h = silu(g) ⊙ u, y = h·W_dᵀ. Backward: d_W_d += dyᵀ·h, dh = dy·W_d, the activation's gradient,
/// dx = d_g·W_g + d_u·W_u, d_W_g += d_gᵀ·x, d_W_u += d_uᵀ·x. The weights the products read as
/// operands are packed once, at construction, into the layout oneDNN picks for each product (as
/// an engine that repacks at load time would); primitives are made once per thread count.
///
/// With bf16 operands (the limit of a layer with bf16 products) every product reads bf16 and
/// sums into float: the weights are packed in bf16 once, and each step converts what changes —
/// x, dy, h, d_g and d_u, once each, by oneDNN's reorder — as the layer's products round theirs.
/// With int8 operands (an int8 layer's limit; forward only) the products read u8 rows and s8
/// weights and sum in int32 into float outputs, the weights converted once and x and h each step;
/// no scales are applied (the layer's are one multiply per output).
class OneDnnLimit : public LimitOperands {
 public:
  OneDnnLimit(Index rows, Index hidden, Index ffn, moekit::Precision precision = moekit::Precision::scalar)
      : LimitOperands(rows, hidden, ffn),
        source_type_(precision == moekit::Precision::bf16   ? dt::bf16
                     : precision == moekit::Precision::int8 ? dt::u8
                                                            : dt::f32),
        weight_type_(precision == moekit::Precision::int8 ? dt::s8 : source_type_) {}

  void forward(int threads) {
    auto& p = products(threads);
    const auto x = p.operand(x_);
    p.gate(g_, x);
    p.up(u_, x);
    rows_in_parallel(threads, [&](Index first, Index n) {
      moekit::detail::activate_gated<moekit::SwiGLU>(g_.middleRows(first, n), u_.middleRows(first, n),
                                                     h_.middleRows(first, n));
    });
    p.down(y_, p.operand(h_));
    p.stream.wait();
  }

  void backward(int threads) {
    auto& p = products(threads);
    auto& b = p.backward.value();  // none for int8, which runs forward only
    const auto dy = p.operand(dy_), h = p.operand(h_);
    b.d_down_w(d_down_w_, dy, &h);  // before h's buffer becomes dh
    b.d_hidden(h_, dy);
    p.stream.wait();
    rows_in_parallel(threads, [&](Index first, Index n) {
      moekit::detail::activate_gated_backward<moekit::SwiGLU>(g_.middleRows(first, n), u_.middleRows(first, n),
                                                              h_.middleRows(first, n));
    });
    const auto d_gate = p.operand(g_), d_up = p.operand(u_), x = p.operand(x_);
    b.dx_gate(dx_, d_gate);
    b.dx_up(dx_, d_up);
    b.d_gate_w(d_gate_w_, d_gate, &x);
    b.d_up_w(d_up_w_, d_up, &x);
    p.stream.wait();
  }

 private:
  using dt = dnnl::memory::data_type;
  using Dims = dnnl::memory::dims;

  /// A [rows, cols] operand of `type` in row-major order or transposed (the matrix's transpose,
  /// read in place).
  static dnnl::memory::desc plain(Index rows, Index cols, bool transposed = false, dt type = dt::f32) {
    return {Dims{rows, cols}, type, transposed ? Dims{1, rows} : Dims{cols, 1}};
  }

  /// One product c (+)= a · b on `engine` and `stream`: its primitive, and b packed once when it
  /// is a weight. a and b are of the limit's operand type, c float.
  struct Product {
    const dnnl::engine& engine;
    dnnl::stream& stream;
    dnnl::matmul matmul;
    dnnl::memory packed;  // the weight in oneDNN's layout; empty when b changes every step
    dnnl::memory::desc c;

    Product(const dnnl::engine& engine, dnnl::stream& stream, dnnl::memory::desc a_desc, dnnl::memory::desc b_desc,
            dnnl::memory::desc c_desc, bool accumulate, const float* weight)
        : engine(engine), stream(stream), c(c_desc) {
      dnnl::primitive_attr attr;
      if (accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.0f);
        attr.set_post_ops(ops);
      }
      const auto weights =
          weight ? dnnl::memory::desc(b_desc.dims(), b_desc.data_type(), dnnl::memory::format_tag::any) : b_desc;
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_desc, weights, c_desc), attr, engine);
      matmul = dnnl::matmul(pd);
      if (weight) {  // the float weight, reordered (and rounded) into the product's layout once
        packed = dnnl::memory(pd.weights_desc(), engine);
        dnnl_memory_desc_t as_given = b_desc.data;  // b's layout, in float
        as_given.data_type = dnnl_f32;
        dnnl::memory given(dnnl::memory::desc(as_given), engine, const_cast<float*>(weight));
        dnnl::reorder(given, packed).execute(stream, given, packed);
        stream.wait();
      }
    }

    /// c (+)= a · b, b the packed weight unless given.
    void operator()(Matrix& c_matrix, const dnnl::memory& a, const dnnl::memory* b = nullptr) const {
      const dnnl::memory c_memory(c, engine, c_matrix.data());
      matmul.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b ? *b : packed}, {DNNL_ARG_DST, c_memory}});
    }
  };

  /// The six products of backward (float and bf16 operands).
  struct BackwardProducts {
    Product d_down_w, d_hidden, dx_gate, dx_up, d_gate_w, d_up_w;
  };

  /// The nine products at one thread count (three for int8), and the operands of this step.
  struct Products {
    dnnl::engine engine{dnnl::engine::kind::cpu, 0};
    dnnl::stream stream{engine};
    dt source, weight;
    Product gate, up, down;
    std::optional<BackwardProducts> backward;
    std::map<const float*, dnnl::memory> converted;  // each matrix's operand-type copy

    Products(const OneDnnLimit& l, dt source, dt weight)
        : source(source), weight(weight),
          gate(engine, stream, in(l.rows(), l.hidden()), w(l.hidden(), l.ffn(), true), plain(l.rows(), l.ffn()),
               false, l.gate_.data()),
          up(engine, stream, in(l.rows(), l.hidden()), w(l.hidden(), l.ffn(), true), plain(l.rows(), l.ffn()),
             false, l.up_.data()),
          down(engine, stream, in(l.rows(), l.ffn()), w(l.ffn(), l.hidden(), true), plain(l.rows(), l.hidden()),
               false, l.down_.data()) {
      if (source == dt::u8) return;
      backward.emplace(BackwardProducts{
          {engine, stream, in(l.hidden(), l.rows(), true), in(l.rows(), l.ffn()), plain(l.hidden(), l.ffn()), true,
           nullptr},
          {engine, stream, in(l.rows(), l.hidden()), w(l.hidden(), l.ffn()), plain(l.rows(), l.ffn()), false,
           l.down_.data()},
          {engine, stream, in(l.rows(), l.ffn()), w(l.ffn(), l.hidden()), plain(l.rows(), l.hidden()), false,
           l.gate_.data()},
          {engine, stream, in(l.rows(), l.ffn()), w(l.ffn(), l.hidden()), plain(l.rows(), l.hidden()), true,
           l.up_.data()},
          {engine, stream, in(l.ffn(), l.rows(), true), in(l.rows(), l.hidden()), plain(l.ffn(), l.hidden()), true,
           nullptr},
          {engine, stream, in(l.ffn(), l.rows(), true), in(l.rows(), l.hidden()), plain(l.ffn(), l.hidden()), true,
           nullptr}});
    }

    /// An activation operand's and a weight's description in the limit's types.
    dnnl::memory::desc in(Index rows, Index cols, bool transposed = false) const {
      return plain(rows, cols, transposed, source);
    }
    dnnl::memory::desc w(Index rows, Index cols, bool transposed = false) const {
      return plain(rows, cols, transposed, weight);
    }

    /// m as an operand: itself for float operands; else its copy, converted now.
    dnnl::memory operand(const Matrix& m) {
      dnnl::memory given(plain(m.rows(), m.cols()), engine, const_cast<float*>(m.data()));
      if (source == dt::f32) return given;
      auto it = converted.find(m.data());
      if (it == converted.end()) it = converted.emplace(m.data(), dnnl::memory(in(m.rows(), m.cols()), engine)).first;
      dnnl::reorder(given, it->second).execute(stream, given, it->second);
      return it->second;
    }
  };

  Index rows() const { return x_.rows(); }
  Index hidden() const { return x_.cols(); }
  Index ffn() const { return gate_.rows(); }

  /// The products for `threads` OpenMP threads (oneDNN sizes its work when a primitive is made).
  Products& products(int threads) {
    omp_set_num_threads(threads);
    auto it = products_.find(threads);
    if (it == products_.end()) it = products_.try_emplace(threads, *this, source_type_, weight_type_).first;
    return it->second;
  }

  /// body(first row, count) over equal panels of the rows, on `threads` OpenMP threads.
  template <class Body>
  void rows_in_parallel(int threads, Body body) const {
    const Index extent = rows();
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int p = 0; p < threads; ++p) {
      const Index first = extent * p / threads, last = extent * (p + 1) / threads;
      if (last > first) body(first, last - first);
    }
  }

  dt source_type_, weight_type_;
  std::map<int, Products> products_;
};

using LimitGemms = OneDnnLimit;
/// Whether the limit's products compute in a bf16 or int8 layer's precision (else in float).
inline constexpr bool limit_has_precisions = true;
/// What the limit is, for the benchmarks' context.
inline std::string limit_label() {
  const auto* v = dnnl::version();
  return "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) +
         " matmul";
}

#else

using LimitGemms = EigenLimit;
inline constexpr bool limit_has_precisions = false;  // bf16 and int8 layers are held to the float limit
inline std::string limit_label() { return "Eigen GEMM (oneDNN was not found when this was built)"; }

#endif

}  // namespace probes
