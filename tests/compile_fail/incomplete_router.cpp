// A type that declares the router kind but lacks the members a Router needs.
#include <moekit/moekit.hpp>
struct HalfRouter {
  using policy_kind = moekit::router_kind;
  static constexpr std::string_view name = "HalfRouter";
  static constexpr int top_k = 1;
};
int main() {
  moekit::MoELayer<HalfRouter> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
