#!/usr/bin/env python3
"""What a translation unit that uses moekit costs to compile: seconds and peak memory.

    scripts/compile_cost.py [--cxx g++] [--flags="-O2"] [--repeat 1] [-I DIR ...]

Compiles, one after another (nothing else should run meanwhile), the two files of
benchmarks/compile_cost/: include_only.cpp (includes <moekit/moekit.hpp>, uses nothing) and
layer_forward.cpp (builds MoELayer<TopK<2>> and calls forward), each header-only and with the
kernels compiled once elsewhere (-DMOEKIT_COMPILED_KERNELS), then that one file,
moekit/compiled_kernels.cpp, itself. Prints a table; with --repeat N, the fastest of N runs and
the largest memory. Include directories: the repository's include/ and Eigen's (found under
/usr/include/eigen3 unless given); -I adds more.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_once(command):
    """Seconds and peak resident memory (MB) of one compiler run, its subprocesses included."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    errors = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("compile_cost: failed: %s\n%s" % (" ".join(command), errors))
    return seconds, usage.ru_maxrss / 1024.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    parser.add_argument("--flags", default="-O2", help="optimisation and other flags (default -O2)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("-I", dest="include", action="append", default=[])
    args = parser.parse_args()

    includes = [os.path.join(ROOT, "include")] + args.include
    if not any(os.path.exists(os.path.join(d, "Eigen", "Core")) for d in includes):
        includes.append("/usr/include/eigen3")
    base = [args.cxx, "-std=c++20", *args.flags.split(), "-DEIGEN_DONT_PARALLELIZE"]
    base += ["-I" + d for d in includes]
    output = os.path.join("/tmp", "moekit_compile_cost_%d.o" % os.getpid())

    sources = os.path.join(ROOT, "benchmarks", "compile_cost")
    runs = [
        ("include_only.cpp", "header-only", [os.path.join(sources, "include_only.cpp")]),
        ("layer_forward.cpp", "header-only", [os.path.join(sources, "layer_forward.cpp")]),
        ("layer_forward.cpp", "kernels compiled once",
         ["-DMOEKIT_COMPILED_KERNELS", os.path.join(sources, "layer_forward.cpp")]),
        ("moekit/compiled_kernels.cpp", "the kernels, once",
         [os.path.join(ROOT, "include", "moekit", "compiled_kernels.cpp")]),
    ]
    print("compiler: %s %s" % (args.cxx, args.flags))
    print("%-28s %-22s %8s %9s" % ("file", "how", "seconds", "peak MB"))
    for name, how, extra in runs:
        seconds, memory = [], []
        for _ in range(args.repeat):
            s, m = compile_once(base + ["-c", "-o", output] + extra)
            seconds.append(s)
            memory.append(m)
        print("%-28s %-22s %8.1f %9.0f" % (name, how, min(seconds), max(memory)), flush=True)
    if os.path.exists(output):
        os.remove(output)


if __name__ == "__main__":
    main()
