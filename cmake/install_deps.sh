#!/usr/bin/env bash
# Installs the Debian 12 packages moekit builds, tests and benchmarks with; installs only what is
# missing, so running it again does nothing. Needs root (or sudo).
set -euo pipefail

# The single-process layer (moekit::moekit) needs the compiler and the three libraries marked
# "layer"; moekit::distributed adds the MPI line; the rest is for moekit's own tests and tools.
packages=(
  g++ make cmake pkg-config
  libeigen3-dev              # layer: math
  libtbb-dev                 # layer: threads
  libboost-dev               # layer: Hana (compile-time composition)
  libboost-mpi-dev libopenmpi-dev openmpi-bin   # distributed: collectives between ranks
  libgtest-dev libgmock-dev  # tests
  libbenchmark-dev           # benchmarks
  libdnnl-dev                # benchmarks only: oneDNN's matmul, the limit the layer is held to
  python3                    # scripts/performance_report.py, compile_cost.py and their tests
  git                        # the test that builds the README's first command in a fresh clone
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  as_root=(sudo)
fi
echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
