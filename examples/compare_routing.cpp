// Trains the routers and balancers of the literature on one task, with the same seeds, batches and
// budget, and prints a table like a paper's: the loss reached, how even the experts' load is
// (MaxVio), the choices a capacity dropped, the logits' size and the training speed.
//
//   compare_routing [--steps N] [--seeds S] [--markdown PATH] [--svg PATH]
//
// The task is train_mixture's (each token from one of eight clusters, its target that cluster's
// own SwiGLU network) with the clusters skewed: cluster c comes ∝ 1/(c + 1), so routing each
// cluster to its own experts, which fits the task best, loads the experts unevenly, and the
// balancers must trade one for the other. Every run: TopK<2> (plain, GShard's or Shazeer's noisy
// gating), Switch, Hash routing by token id (each cluster's tokens 32 words) or Expert Choice over
// eight experts, Adam (lr 3e-3), 256 tokens a step, the same batches for every combination of a seed.
// Measured on 4096 held-out tokens in evaluation mode:
//   loss     mean squared error
//   MaxVio   max_i load_i / mean load − 1 (Wang et al., Loss-Free Balancing): 0 is even
//   dropped  the share of choices a capacity dropped
//   LSE²     the mean over tokens of logsumexp(router logits)², what the z-loss shrinks (— for Hash: no logits)
// and over training: MaxVio_batch, the mean over the last quarter's steps of each batch's MaxVio,
// and tokens per second (forward, backward and Adam, on every thread).
// Exits non-zero if a loss is not finite or a balancer leaves the training batches' load
// (MaxVio_batch) less even than no balancing does.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <moekit/moekit.hpp>

#include "mixture_task.hpp"

namespace {

using namespace mixture;
using moekit::Index;

constexpr Index held_out = 4096;
/// Hash routing's token ids: each cluster's tokens are this many words, drawn uniformly; a word's
/// id is cluster · words_per_cluster + word.
constexpr Index words_per_cluster = 32;

/// What one combination reached on one seed.
struct Outcome {
  double loss = 0, max_vio = 0, max_vio_batch = 0, dropped = 0, lse2 = 0, tokens_per_second = 0;
};

/// One row of the table: a combination and its outcomes over the seeds.
struct Row {
  std::string router, balancer, dispatcher;
  int baseline = -1;  // for a load balancer, the row of the same router and dispatcher without one
  std::vector<Outcome> runs;
};

double max_vio(std::span<const Index> load) {
  double total = 0, largest = 0;
  for (Index n : load) total += double(n), largest = std::max(largest, double(n));
  return total > 0 ? largest * double(load.size()) / total - 1 : 0;
}

/// The mean over tokens of logsumexp(x·Wᵀ)², W the router's weight.
template <class Layer>
double mean_lse_squared(const Layer& layer, const Matrix& x) {
  const auto& w = layer.parameter("router.weight");
  const Matrix logits = x * moekit::ConstMatrixMap<float>(w.values().data(), experts, hidden).transpose();
  double sum = 0;
  for (Index t = 0; t < logits.rows(); ++t) {
    const double top = logits.row(t).maxCoeff();
    const double lse = top + std::log((logits.row(t).array() - float(top)).exp().sum());
    sum += lse * lse;
  }
  return sum / double(logits.rows());
}

/// Trains a layer of the given policies for `steps` on the task of `seed`, then measures it.
template <class R, class B, class D>
Outcome train(const R& router, const B& balancer, const D& dispatcher, unsigned seed, int steps,
              const std::vector<double>& frequency) {
  using Layer = moekit::MoELayer<R, B, D, moekit::GroupedGemm, float>;
  Task task(seed, frequency);
  Layer layer({.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed}, router, balancer, dispatcher);
  moekit::Adam<float> adam({.learning_rate = 3e-3});
  Matrix x(batch, hidden), target(batch, hidden), y(batch, hidden), dy(batch, hidden), dx(batch, hidden);
  std::vector<int> cluster(batch);
  std::mt19937 words(seed + 7777);  // a stream apart from the task's: every combination sees the same batches
  auto tell_token_ids = [&](const std::vector<int>& clusters) {
    if constexpr (moekit::RouterReadsTokenIds<R>) {
      std::uniform_int_distribution<Index> word(0, words_per_cluster - 1);
      std::vector<Index> ids(clusters.size());
      for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = clusters[t] * words_per_cluster + word(words);
      layer.set_token_ids(ids);
    }
  };
  Outcome out;
  int measured = 0;
  double seconds = 0;
  for (int step = 0; step < steps; ++step) {
    task.sample(x, target, cluster);
    tell_token_ids(cluster);
    const auto start = std::chrono::steady_clock::now();
    layer.forward(x, y);
    dy = (y - target) * (2.0f / float(y.size()));
    layer.zero_grad();
    layer.backward(dy, dx);
    adam.step(layer.parameters(), layer.gradients());
    layer.end_step();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (4 * step >= 3 * steps) out.max_vio_batch += max_vio(layer.tokens_per_expert()), ++measured;
  }
  out.max_vio_batch /= std::max(1, measured);
  out.tokens_per_second = double(steps) * double(batch) / seconds;

  Matrix x_test(held_out, hidden), target_test(held_out, hidden), y_test(held_out, hidden);
  std::vector<int> cluster_test(held_out);
  task.sample(x_test, target_test, cluster_test);
  tell_token_ids(cluster_test);
  layer.eval();
  layer.forward(x_test, y_test);
  out.loss = (y_test - target_test).squaredNorm() / double(y_test.size());
  out.max_vio = max_vio(layer.tokens_per_expert());
  out.dropped = double(layer.stats().dropped) / double(layer.stats().choices);
  if constexpr (moekit::router_scores<R>)
    out.lse2 = mean_lse_squared(layer, x_test);
  else
    out.lse2 = std::nan("");  // no logits
  return out;
}

struct Summary {
  double mean = 0, spread = 0;  // over the seeds: the mean and the standard deviation
};

template <class Field>
Summary summarise(const Row& row, Field field) {
  Summary s;
  for (const auto& r : row.runs) s.mean += field(r);
  s.mean /= double(row.runs.size());
  for (const auto& r : row.runs) s.spread += (field(r) - s.mean) * (field(r) - s.mean);
  s.spread = row.runs.size() > 1 ? std::sqrt(s.spread / double(row.runs.size() - 1)) : 0;
  return s;
}

std::string format(const char* pattern, auto... values) {
  char text[256];
  std::snprintf(text, sizeof text, pattern, values...);
  return text;
}

std::string markdown(const std::vector<Row>& rows, int steps, int seeds) {
  std::string s = format("Every run: %d steps of %ld tokens, %d seed%s (mean ± standard deviation); measured on %ld "
                         "held-out tokens in evaluation mode but MaxVio_batch (training, last quarter) and tokens/s.\n\n",
                         steps, long(batch), seeds, seeds > 1 ? "s" : "", long(held_out));
  s += "| router | balancing | dispatch | loss ×10³ | MaxVio | MaxVio_batch | dropped | LSE² | tokens/s |\n";
  s += "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const auto& row : rows) {
    auto cell = [&](auto field, double scale, const char* pattern) {
      const Summary m = summarise(row, field);
      return std::isnan(m.mean) ? std::string("—") : format(pattern, m.mean * scale, m.spread * scale);
    };
    s += "| " + row.router + " | " + row.balancer + " | " + row.dispatcher + " | " +
         cell([](const Outcome& o) { return o.loss; }, 1e3, "%.2f ± %.2f") + " | " +
         cell([](const Outcome& o) { return o.max_vio; }, 1, "%.2f ± %.2f") + " | " +
         cell([](const Outcome& o) { return o.max_vio_batch; }, 1, "%.2f ± %.2f") + " | " +
         cell([](const Outcome& o) { return o.dropped; }, 100, "%.1f%% ± %.1f") + " | " +
         cell([](const Outcome& o) { return o.lse2; }, 1, "%.2f ± %.2f") + " | " +
         cell([](const Outcome& o) { return o.tokens_per_second; }, 1e-3, "%.0fk ± %.0f") + " |\n";
  }
  return s;
}

/// Text for SVG: "TopK<2>" as "TopK&lt;2&gt;".
std::string escaped(const std::string& text) {
  std::string s;
  for (const char c : text) s += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return s;
}

/// Loss (on a log scale) against MaxVio, one numbered point per combination (the mean over the seeds).
std::string svg(const std::vector<Row>& rows) {
  constexpr double width = 980, height = 460, left = 70, right = 420, top = 20, bottom = 50;
  const auto loss = [](const Outcome& o) { return 1e3 * o.loss; };
  const auto vio = [](const Outcome& o) { return o.max_vio; };
  double max_x = 0, low = 1e300, high = 0;
  for (const auto& row : rows) {
    max_x = std::max(max_x, summarise(row, vio).mean);
    low = std::min(low, summarise(row, loss).mean), high = std::max(high, summarise(row, loss).mean);
  }
  max_x = std::ceil(max_x * 1.1 * 2) / 2;
  const double first_decade = std::floor(std::log10(low)), last_decade = std::ceil(std::log10(high));
  auto px = [&](double v) { return left + v / max_x * (width - left - right); };
  auto py = [&](double v) {
    return height - bottom - (std::log10(v) - first_decade) / (last_decade - first_decade) * (height - top - bottom);
  };
  std::string s = format("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                         "font-family=\"sans-serif\" font-size=\"11\">\n", width, height);
  s += format("<rect width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", width, height);
  const double bottom_y = height - bottom;
  s += format("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", left, bottom_y, px(max_x), bottom_y);
  s += format("<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", left, bottom_y, left, top);
  for (double vx = 0; vx <= max_x + 1e-9; vx += 0.5)
    s += format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.1f</text>\n", px(vx), bottom_y + 16, vx);
  for (double decade = first_decade; decade <= last_decade; ++decade)
    for (const double m : {1.0, 2.0, 5.0}) {
      const double v = m * std::pow(10.0, decade);
      if (std::log10(v) > last_decade + 1e-9) break;
      s += format("<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, py(v), px(max_x), py(v));
      s += format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 6, py(v) + 4, v);
    }
  s += format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">MaxVio on held-out tokens (0 = even load)</text>\n",
              px(max_x / 2), height - 12);
  s += format("<text transform=\"translate(16 %.1f) rotate(-90)\" text-anchor=\"middle\">held-out loss ×10³ (log scale)</text>\n",
              (top + bottom_y) / 2);
  const char* colours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                           "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
                           "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"};
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const char* colour = colours[i % std::size(colours)];
    const double x = summarise(rows[i], vio).mean, y = summarise(rows[i], loss).mean;
    s += format("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"5\" fill=\"%s\"/>\n", px(x), py(y), colour);
    s += format("<text x=\"%.1f\" y=\"%.1f\" fill=\"%s\" font-size=\"10\">%zu</text>\n", px(x) + 7, py(y) + 4, colour,
                i + 1);
    const double key_y = top + 8 + 16.0 * double(i);
    s += format("<circle cx=\"%.0f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>\n", width - right + 20, key_y, colour);
    s += format("<text x=\"%.0f\" y=\"%.1f\">%zu  ", width - right + 30, key_y + 4, i + 1) +
         escaped(rows[i].router + ", " + rows[i].balancer + ", " + rows[i].dispatcher) + "</text>\n";
  }
  return s + "</svg>\n";
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 1000, seeds = 5;
  std::string markdown_path, svg_path;
  bool understood = true;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) understood = false;
    else if (flag == "--steps") steps = std::max(8, std::atoi(argv[i + 1]));
    else if (flag == "--seeds") seeds = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--markdown") markdown_path = argv[i + 1];
    else if (flag == "--svg") svg_path = argv[i + 1];
    else understood = false;
  }
  if (!understood) {
    std::fprintf(stderr, "usage: compare_routing [--steps N] [--seeds S] [--markdown PATH] [--svg PATH]\n");
    return 2;
  }

  std::vector<double> frequency(clusters);
  for (Index c = 0; c < clusters; ++c) frequency[static_cast<std::size_t>(c)] = 1.0 / double(c + 1);

  using namespace moekit;
  const TopK<2> top2{};
  const TopK<2> sigmoid_top2{{.score = ScoreFn::sigmoid, .normalize = true}};
  const TopK<2> gshard{{.random_second = 0.2, .seed = 1}};
  const TopK<2> noisy_top2{{.noisy_gating = true, .seed = 1}};
  const Switch switch_router{}, jittered_switch{{.jitter = 1e-2, .seed = 1}};
  const Capacity capacity{{.capacity_factor = 1.25}};
  std::vector<Row> rows;
  // Trains one combination on every seed and adds its row; returns the row's number.
  auto compare = [&](std::string router_name, std::string balancer_name, std::string dispatcher_name, int baseline,
                     const auto& router, const auto& balancer, const auto& dispatcher) {
    Row row{std::move(router_name), std::move(balancer_name), std::move(dispatcher_name), baseline, {}};
    for (int s = 1; s <= seeds; ++s)
      row.runs.push_back(train(router, balancer, dispatcher, static_cast<unsigned>(s), steps, frequency));
    std::printf("%-22s %-24s %-16s loss %.5f  MaxVio %.2f  dropped %.1f%%  LSE² %.2f\n", row.router.c_str(),
                row.balancer.c_str(), row.dispatcher.c_str(), summarise(row, [](const Outcome& o) { return o.loss; }).mean,
                summarise(row, [](const Outcome& o) { return o.max_vio; }).mean,
                100 * summarise(row, [](const Outcome& o) { return o.dropped; }).mean,
                summarise(row, [](const Outcome& o) { return o.lse2; }).mean);
    std::fflush(stdout);
    rows.push_back(std::move(row));
    return static_cast<int>(rows.size()) - 1;
  };
  constexpr int none = -1;
  const int top2_dropless = compare("TopK<2> softmax", "NoBalance", "Dropless", none, top2, NoBalance{}, Dropless{});
  compare("TopK<2> softmax", "AuxLoss 1e-2", "Dropless", top2_dropless, top2, AuxLoss{}, Dropless{});
  compare("TopK<2> softmax", "AuxFree 1e-3", "Dropless", top2_dropless, top2, AuxFree{}, Dropless{});
  compare("TopK<2> softmax", "Sinkhorn", "Dropless", top2_dropless, top2, Sinkhorn{}, Dropless{});
  compare("TopK<2> softmax", "ZLoss 1e-3", "Dropless", none, top2, ZLoss{}, Dropless{});
  compare("TopK<2> softmax", "AuxLoss + ZLoss", "Dropless", top2_dropless, top2, Balanced<AuxLoss, ZLoss>{}, Dropless{});
  const int sigmoid_dropless = compare("TopK<2> sigmoid", "NoBalance", "Dropless", none, sigmoid_top2, NoBalance{}, Dropless{});
  compare("TopK<2> sigmoid", "AuxFree + SeqAuxLoss", "Dropless", sigmoid_dropless, sigmoid_top2,
          Balanced<AuxFree, SeqAuxLoss>{}, Dropless{});
  compare("TopK<2> softmax", "ImportanceLoss 0.1", "Dropless", top2_dropless, top2, ImportanceLoss{}, Dropless{});
  const int noisy_dropless = compare("Noisy TopK<2> (Shazeer)", "NoBalance", "Dropless", none, noisy_top2, NoBalance{}, Dropless{});
  compare("Noisy TopK<2> (Shazeer)", "Importance + Load 0.1", "Dropless", noisy_dropless, noisy_top2,
          Balanced<ImportanceLoss, LoadLoss>{}, Dropless{});
  const int top2_capacity = compare("TopK<2> softmax", "NoBalance", "Capacity 1.25", none, top2, NoBalance{}, capacity);
  compare("TopK<2> softmax", "AuxLoss 1e-2", "Capacity 1.25", top2_capacity, top2, AuxLoss{}, capacity);
  const int gshard_capacity = compare("GShard: random 2nd, θ 0.2", "NoBalance", "Capacity 1.25", none, gshard, NoBalance{}, capacity);
  compare("GShard: random 2nd, θ 0.2", "AuxLoss 1e-2", "Capacity 1.25", gshard_capacity, gshard, AuxLoss{}, capacity);
  const int switch_dropless = compare("Switch", "NoBalance", "Dropless", none, switch_router, NoBalance{}, Dropless{});
  compare("Switch", "AuxLoss 1e-2", "Dropless", switch_dropless, switch_router, AuxLoss{}, Dropless{});
  const int switch_capacity = compare("Switch", "NoBalance", "Capacity 1.25", none, switch_router, NoBalance{}, capacity);
  compare("Switch", "AuxLoss 1e-2", "Capacity 1.25", switch_capacity, switch_router, AuxLoss{}, capacity);
  compare("Switch + jitter 1e-2", "AuxLoss 1e-2", "Capacity 1.25", switch_capacity, jittered_switch, AuxLoss{}, capacity);
  // Hash routing by the words' ids: the random hash; the balanced assignment from the words'
  // expected counts; and each word to its cluster's expert, the routing that fits this task best.
  std::vector<double> word_counts;
  std::vector<Index> by_cluster;
  for (Index id = 0; id < clusters * words_per_cluster; ++id) {
    word_counts.push_back(frequency[static_cast<std::size_t>(id / words_per_cluster)] / double(words_per_cluster));
    by_cluster.push_back(id / words_per_cluster * experts / clusters);
  }
  compare("Hash: random", "NoBalance", "Dropless", none, Hash{{.seed = 1}}, NoBalance{}, Dropless{});
  compare("Hash: balanced table", "NoBalance", "Dropless", none, Hash{{.table = Hash::balanced_table(word_counts, experts)}},
          NoBalance{}, Dropless{});
  compare("Hash: cluster's expert", "NoBalance", "Dropless", none, Hash{{.table = by_cluster}}, NoBalance{}, Dropless{});
  // Expert Choice: each expert takes the 2 · 256 / 8 tokens of a batch that score it highest (at
  // evaluation, of the held-out batch: the choice is over the whole batch).
  compare("Expert Choice, cf 2", "NoBalance", "Dropless", none, ExpertChoice{}, NoBalance{}, Dropless{});
  compare("Expert Choice, cf 2", "ZLoss 1e-3", "Dropless", none, ExpertChoice{}, ZLoss{}, Dropless{});

  const std::string table = markdown(rows, steps, seeds);
  std::printf("\n%s", table.c_str());
  if (!markdown_path.empty()) std::ofstream(markdown_path) << table;
  if (!svg_path.empty()) std::ofstream(svg_path) << svg(rows);

  // Every loss finite, and each balancer's load more even than the unbalanced run's with the same
  // router and dispatcher.
  bool ok = true;
  for (const auto& row : rows) {
    const double loss = summarise(row, [](const Outcome& o) { return o.loss; }).mean;
    if (!std::isfinite(loss)) ok = false, std::printf("compare_routing: %s, %s: loss %g\n", row.router.c_str(), row.balancer.c_str(), loss);
    if (row.baseline == none) continue;
    const auto batch_max_vio = [](const Outcome& o) { return o.max_vio_batch; };
    const double mine = summarise(row, batch_max_vio).mean;
    const double theirs = summarise(rows[static_cast<std::size_t>(row.baseline)], batch_max_vio).mean;
    if (mine >= theirs)
      ok = false, std::printf("compare_routing: %s, %s, %s: MaxVio_batch %.2f, not below NoBalance's %.2f\n",
                              row.router.c_str(), row.balancer.c_str(), row.dispatcher.c_str(), mine, theirs);
  }
  std::printf("compare_routing: %s\n", ok ? "passed (every loss finite; every balancer evens the load against NoBalance)"
                                          : "FAILED");
  return ok ? 0 : 1;
}
