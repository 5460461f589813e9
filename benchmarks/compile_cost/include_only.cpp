// What including moekit costs a translation unit that uses nothing of it (scripts/compile_cost.py).
#include <moekit/moekit.hpp>

int main() { return 0; }
