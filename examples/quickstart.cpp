// The smallest complete use of moekit: build a layer, run it forward and backward, take a step.
#include <moekit/moekit.hpp>

#include <cstdio>

int main() {
  // Policies in any order; a kind left out gets its default.
  using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless,
                                 moekit::GroupedGemm>;
  Layer layer({.hidden = 64, .ffn = 128, .experts = 8, .seed = 1},
              moekit::AuxLoss{{.coefficient = 1e-2}});

  const moekit::Matrix<float> x = moekit::Matrix<float>::Random(32, 64);  // [T,H]
  const moekit::Matrix<float> y = layer.forward(x);                      // [T,H]

  // Gradients of Σ(y ⊙ dy) + balance_loss(); here dy = y, i.e. the loss ½‖y‖².
  layer.zero_grad();
  const moekit::Matrix<float> dx = layer.backward(y);

  moekit::Adam<float> adam({.learning_rate = 1e-3});
  adam.step(layer.parameters(), layer.gradients());

  std::printf("y %ldx%ld, dx %ldx%ld, aux loss %.4f, tokens per expert:", long(y.rows()),
              long(y.cols()), long(dx.rows()), long(dx.cols()), double(layer.balance_loss()));
  for (auto n : layer.tokens_per_expert()) std::printf(" %ld", long(n));
  std::printf("\n");
  layer.save("quickstart.safetensors");
}
