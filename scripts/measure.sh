#!/usr/bin/env bash
# Measures this machine and writes its section of docs/performance.md, and its plot:
#
#   scripts/measure.sh SECTION "the machine, in words" [BUILD]     # BUILD: build by default
#
# layer_benchmark at 1, 2, 4, … threads up to all the cores (the standard shape, many small
# experts, the triad, the cores' multiply-adds and decode), then the policy matrix (T = 512) on
# all the cores, then scripts/performance_report.py over both. The section's markers must be in
# the document (MEASURE_DOC, default docs/performance.md). The JSON is kept in MEASURE_OUT
# (default: a new temporary folder), to be read again or compared. MEASURE_PYTORCH names a Python
# that has PyTorch: scripts/pytorch_baseline.py then runs too, on one thread and all the cores,
# and the section gets its table.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n 2,12p "$0" >&2
  exit 2
fi
section=$1 machine=$2 build=${3:-build} doc=${MEASURE_DOC:-docs/performance.md}
bench=$build/benchmarks/layer_benchmark
if [ ! -x "$bench" ]; then
  echo "measure: no $bench; build it first: cmake --build $build -j2 --target layer_benchmark" >&2
  exit 1
fi
if ! grep -q "<!-- report:$section:begin -->" "$doc"; then
  echo "measure: $doc has no <!-- report:$section:begin --> marker; add the section first" >&2
  exit 1
fi
out=${MEASURE_OUT:-$(mktemp -d)}
mkdir -p "$out"
cores=$(nproc)

# bench_json FILE ARGS…: layer_benchmark's JSON into FILE, and the command, quoted, into the report's.
commands=()
bench_json() {
  local file=$1
  shift
  "$bench" "$@" --benchmark_format=json > "$file"
  commands+=("$bench ${*@Q} --benchmark_format=json")
}
bench_json "$out/scaling.json" --benchmark_filter='T:2048|triad|fma|decode'
bench_json "$out/matrix.json" --threads="$cores" --benchmark_filter='T:512'
jsons=("$out/scaling.json" "$out/matrix.json")
if [ -n "${MEASURE_PYTORCH:-}" ]; then
  "$MEASURE_PYTORCH" scripts/pytorch_baseline.py --threads "1,$cores" > "$out/pytorch.json"
  commands+=("$MEASURE_PYTORCH scripts/pytorch_baseline.py --threads 1,$cores")
  jsons+=("$out/pytorch.json")
fi
command=$(printf '%s; ' "${commands[@]}")
command=${command%; }

# 16-core → performance_limit_16core.svg, 16-core-ci-build → performance_limit_16core_ci_build.svg
plot=performance_limit_$(echo "$section" | sed 's/-core/core/; s/-/_/g').svg
python3 scripts/performance_report.py "${jsons[@]}" \
  --section "$section" --plot "$plot" --machine "$machine" --command "$command" --doc "$doc"
echo "measure: section $section of $doc and $(dirname "$doc")/$plot written; JSON in $out"
