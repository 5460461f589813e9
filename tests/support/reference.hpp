#pragma once
// The layer's forward pass written out from the formulas, token by token, sharing no code with
// the library: softmax/sigmoid scores, top-k by a stable sort, weights, each expert's FFN, the
// aux loss; and the balancing terms' formulas (z-loss, CV², Shazeer's load). Tests hold the
// layer to them.
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit::test {

struct RouterSpec {
  ScoreFn score = ScoreFn::softmax;
  bool normalize = true;
  double scale = 1.0;
  const Matrix<double>* router_input = nullptr;  // the x the router reads, if not x (jittered) [T,H]
  const Matrix<double>* logit_noise = nullptr;   // added to the logits (noisy gating's n ⊙ softplus(x·W_nᵀ)) [T,E]
};

enum class Unit { swiglu, gelu, relu, clamped_swiglu };

/// Each expert's biases: gate, up [E,F] and down [E,H]; empty for experts without them.
struct Biases {
  std::vector<double> gate, up, down;
};

struct ReferenceResult {
  Matrix<double> y;
  std::vector<std::vector<Index>> chosen;  // [T][K]
  double aux_loss = 0;                     // with coefficient 1
  std::vector<double> importance;          // [E] each expert's sum of the kept choices' weights
  Matrix<double> logits;                   // [T,E] what the router scored (noise included)
};

inline double unit(Unit u, double g) {
  switch (u) {
    case Unit::swiglu: return g / (1 + std::exp(-g));
    case Unit::gelu: return 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
    case Unit::relu: return std::max(g, 0.0);
    case Unit::clamped_swiglu: g = std::min(g, 7.0); return g / (1 + std::exp(-1.702 * g));
  }
  return 0;
}

/// What a gated unit multiplies act(gate) by: up, or GPT-OSS's clamp(up, −7, 7) + 1.
inline double gated_up(Unit u, double v) { return u == Unit::clamped_swiglu ? std::clamp(v, -7.0, 7.0) + 1 : v; }

/// Choices made elsewhere (a balancer that shapes selection, a dispatcher that drops): the
/// experts of each token [T][K], and whether each was kept [T][K].
struct ForcedChoices {
  std::vector<std::vector<Index>> chosen;
  std::vector<std::vector<bool>> kept;
};

/// Expert e's FFN of token t's x: down · unit(gate · x, up · x) with the biases.        [1,H]
/// gate, up [E,F,H] (gate empty for plain units); down [E,H,F].
inline Matrix<double> reference_expert(const Matrix<double>& x, Index t, Index e, const std::vector<double>& gate,
                                       const std::vector<double>& up, const std::vector<double>& down, Index ffn,
                                       Unit u, const Biases& biases = {}) {
  const Index hidden = x.cols();
  std::vector<double> hid(static_cast<std::size_t>(ffn));
  for (Index f = 0; f < ffn; ++f) {
    const auto column_of_f = static_cast<std::size_t>(e * ffn + f);
    double g = biases.gate.empty() ? 0 : biases.gate[column_of_f], v = biases.up.empty() ? 0 : biases.up[column_of_f];
    for (Index h = 0; h < hidden; ++h) {
      const auto at = static_cast<std::size_t>((e * ffn + f) * hidden + h);
      v += up[at] * x(t, h);
      if (!gate.empty()) g += gate[at] * x(t, h);
    }
    hid[static_cast<std::size_t>(f)] = gate.empty() ? unit(u, v) : unit(u, g) * gated_up(u, v);
  }
  Matrix<double> out(1, hidden);
  for (Index h = 0; h < hidden; ++h) {
    out(0, h) = biases.down.empty() ? 0 : biases.down[static_cast<std::size_t>(e * hidden + h)];
    for (Index f = 0; f < ffn; ++f)
      out(0, h) += down[static_cast<std::size_t>((e * hidden + h) * ffn + f)] * hid[static_cast<std::size_t>(f)];
  }
  return out;
}

/// params: router [E,H]; gate, up [E,F,H] (gate empty for plain units); down [E,H,F]; biases.
/// Without `forced`, the top-k of the scores is chosen and every choice is kept.
inline ReferenceResult reference_forward(const Matrix<double>& x, const std::vector<double>& router,
                                         const std::vector<double>& gate,
                                         const std::vector<double>& up,
                                         const std::vector<double>& down, Index experts, Index ffn,
                                         int k, RouterSpec spec, Unit u,
                                         const ForcedChoices* forced = nullptr, const Biases& biases = {}) {
  const Index tokens = x.rows(), hidden = x.cols();
  ReferenceResult r;
  r.y = Matrix<double>::Zero(tokens, hidden);
  std::vector<double> counts(static_cast<std::size_t>(experts)), column(static_cast<std::size_t>(experts));
  r.importance.assign(static_cast<std::size_t>(experts), 0.0);
  r.logits.resize(tokens, experts);
  for (Index t = 0; t < tokens; ++t) {
    std::vector<double> s(static_cast<std::size_t>(experts));
    for (Index e = 0; e < experts; ++e) {
      double logit = 0;
      for (Index h = 0; h < hidden; ++h)
        logit += router[static_cast<std::size_t>(e * hidden + h)] * (spec.router_input ? *spec.router_input : x)(t, h);
      if (spec.logit_noise) logit += (*spec.logit_noise)(t, e);
      s[static_cast<std::size_t>(e)] = r.logits(t, e) = logit;
    }
    if (spec.score == ScoreFn::softmax) {
      const double m = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (double& v : s) z += v = std::exp(v - m);
      for (double& v : s) v /= z;
    } else {
      for (double& v : s) v = 1 / (1 + std::exp(-v));
    }
    std::vector<Index> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
      return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
    });
    order.resize(static_cast<std::size_t>(k));
    r.chosen.push_back(order);  // the plain top-k, which the aux loss counts

    const double total = std::accumulate(s.begin(), s.end(), 0.0);
    for (Index e : order) counts[static_cast<std::size_t>(e)] += 1;
    for (Index e = 0; e < experts; ++e)
      column[static_cast<std::size_t>(e)] += spec.score == ScoreFn::softmax ? s[static_cast<std::size_t>(e)] : s[static_cast<std::size_t>(e)] / total;

    if (forced) order = forced->chosen[static_cast<std::size_t>(t)];
    double chosen_sum = 0;
    for (Index e : order) chosen_sum += s[static_cast<std::size_t>(e)];
    for (std::size_t j = 0; j < order.size(); ++j) {
      const Index e = order[j];
      if (forced && !forced->kept[static_cast<std::size_t>(t)][j]) continue;  // dropped: nothing
      double w = s[static_cast<std::size_t>(e)] * spec.scale;
      if (spec.normalize) w /= chosen_sum;
      r.importance[static_cast<std::size_t>(e)] += w;
      r.y.row(t) += w * reference_expert(x, t, e, gate, up, down, ffn, u, biases);
    }
  }
  if (tokens > 0) {
    double sum = 0;
    for (Index e = 0; e < experts; ++e) sum += counts[static_cast<std::size_t>(e)] * column[static_cast<std::size_t>(e)];
    r.aux_loss = double(experts) / (k * double(tokens) * double(tokens)) * sum;
  }
  return r;
}

/// ST-MoE's z-loss without its coefficient: the mean over tokens of (log Σ_e exp(l_te))².
inline double reference_z_loss(const Matrix<double>& logits) {
  double sum = 0;
  for (Index t = 0; t < logits.rows(); ++t) {
    const double lse = std::log(logits.row(t).array().exp().sum());
    sum += lse * lse;
  }
  return sum / double(logits.rows());
}

/// Variance over mean² (+ 1e-10) of the values, the population variance (Shazeer et al.'s CV²).
inline double reference_cv_squared(const std::vector<double>& v) {
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  double variance = 0;
  for (double x : v) variance += (x - mean) * (x - mean) / double(v.size());
  return variance / (mean * mean + 1e-10);
}

/// Shazeer et al.'s Load_i = Σ_t Φ((clean_ti − kth_excluding(noisy_t, K, i)) / softplus(noise_ti)),
/// the K-th largest of noisy_t with entry i left out found by sorting the others.
inline std::vector<double> reference_load(const Matrix<double>& clean, const Matrix<double>& noisy,
                                          const Matrix<double>& noise, int k) {
  std::vector<double> load(static_cast<std::size_t>(clean.cols()), 0.0);
  for (Index t = 0; t < clean.rows(); ++t)
    for (Index i = 0; i < clean.cols(); ++i) {
      std::vector<double> others;
      for (Index j = 0; j < clean.cols(); ++j)
        if (j != i) others.push_back(noisy(t, j));
      std::sort(others.begin(), others.end(), std::greater<>());
      const double z = (clean(t, i) - others[static_cast<std::size_t>(k - 1)]) / std::log1p(std::exp(noise(t, i)));
      load[static_cast<std::size_t>(i)] += 0.5 * std::erfc(-z / std::sqrt(2.0));
    }
  return load;
}

}  // namespace moekit::test
