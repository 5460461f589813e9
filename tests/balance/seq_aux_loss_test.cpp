// SeqAuxLoss: AuxLoss's formula per sequence, averaged over the sequences set_sequences() gives;
// with none, AuxLoss itself. Its gradients against central differences over several sequences.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

const LayerConfig config{.hidden = 6, .ffn = 4, .experts = 5, .seed = 7};
using Seq = MoELayer<TopK<2>, SeqAuxLoss, double>;
using Aux = MoELayer<TopK<2>, AuxLoss, double>;

Seq seq_layer() { return Seq(config, SeqAuxLoss{{.coefficient = 0.5}}); }
Aux aux_layer() { return Aux(config, AuxLoss{{.coefficient = 0.5}}); }

TEST(SeqAuxLoss, WithoutSequencesItIsAuxLoss) {
  auto seq = seq_layer();
  auto aux = aux_layer();
  const Matrix<double> x = random_matrix(12, 6, 1), dy = random_matrix(12, 6, 2);
  seq.forward(x);
  aux.forward(x);
  EXPECT_NEAR(seq.balance_loss(), aux.balance_loss(), 1e-15);
  EXPECT_LT((seq.backward(dy) - aux.backward(dy)).norm(), 1e-14);
  EXPECT_LT((seq.gradient("router.weight").matrix() - aux.gradient("router.weight").matrix()).norm(), 1e-14);
}

// Two sequences of 5 and 7 tokens: the mean of AuxLoss on each sequence alone.
TEST(SeqAuxLoss, IsTheMeanOfEachSequencesAuxLoss) {
  auto seq = seq_layer();
  const std::vector<Index> lengths{5, 7};
  seq.set_sequences(lengths);
  const Matrix<double> x = random_matrix(12, 6, 3);
  seq.forward(x);
  auto aux = aux_layer();
  aux.forward(x.topRows(5));
  const double first = aux.balance_loss();
  aux.forward(x.bottomRows(7));
  EXPECT_NEAR(seq.balance_loss(), (first + aux.balance_loss()) / 2, 1e-15);
  auto whole = aux_layer();
  whole.forward(x);
  EXPECT_GT(std::abs(seq.balance_loss() - whole.balance_loss()), 1e-6) << "not the whole batch's loss";
}

TEST(SeqAuxLoss, GradientsMatchCentralDifferencesOverThreeSequences) {
  auto layer = seq_layer();
  const std::vector<Index> lengths{3, 4, 2};
  layer.set_sequences(lengths);
  for (const auto& report : check_gradients(layer, random_matrix(9, 6, 4), random_matrix(9, 6, 5)))
    EXPECT_LT(report.error, 1e-6) << report.name;
}

// DeepSeek-V3's pair: the bias selects, the sequence-wise loss sits beside it, each named.
TEST(SeqAuxLoss, BesideAuxFreeAsDeepSeekV3Trains) {
  MoELayer<TopK<2>, Balanced<AuxFree, SeqAuxLoss>> layer(config, TopK<2>{{.score = ScoreFn::sigmoid, .scale = 2.5}});
  const std::vector<Index> lengths{6, 10};
  layer.set_sequences(lengths);
  const Matrix<float> x = random_matrix<float>(16, 6, 6);
  layer.forward(x);
  layer.backward(x);
  layer.end_step();
  const auto terms = layer.stats().balance_terms;
  ASSERT_EQ(terms.size(), 2u);
  EXPECT_EQ(terms[1].first, "SeqAuxLoss");
  EXPECT_GT(terms[1].second, 0.0);
}

TEST(SeqAuxLoss, SequencesThatDoNotFitAreNamed) {
  auto layer = seq_layer();
  const std::vector<Index> empty_one{5, 0}, short_of_tokens{5, 6};
  EXPECT_EQ(message_of([&] { layer.set_sequences(empty_one); }),
            "moekit::MoELayer::set_sequences: a sequence of 0 tokens; expected at least 1");
  layer.set_sequences(short_of_tokens);
  EXPECT_EQ(message_of([&] { layer.forward(random_matrix(12, 6, 7)); }),
            "moekit::MoELayer::forward: 12 tokens but the sequences set_sequences() gave have 11; expected them to add "
            "up to the tokens");
  layer.set_sequences({});
  EXPECT_EQ(layer.forward(random_matrix(12, 6, 7)).rows(), 12) << "none: the batch is one sequence";
}

}  // namespace
}  // namespace moekit::test
