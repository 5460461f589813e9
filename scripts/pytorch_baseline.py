#!/usr/bin/env python3
"""PyTorch's CPU MoE layers on the shapes of layer_benchmark, held to PyTorch's own limit.

    python3 scripts/pytorch_baseline.py --threads 1,16 > pytorch.json

On Debian 12, PyTorch is `apt-get install python3-torch libopenblas0-openmp` (without OpenBLAS
its matmuls go to the reference BLAS), run with Debian's own /usr/bin/python3.

The comparison moekit's performance target is set against (docs/performance.md). Two ways
PyTorch code writes an MoE layer:
  hf_loop  — a loop over experts with index gathers and index_add_, as Hugging Face's Mixtral
             block writes it;
  permute  — sort the (token, expert) pairs by expert, one matmul chain per expert's contiguous
             rows, then scatter back, as Megatron-style token permutation does.
Both use the same router (softmax over E, top-k, renormalised) and SwiGLU experts. The limit is
PyTorch's: the same SwiGLU matmuls over T·K rows with one expert's weights and no routing.
Backward is autograd's, with respect to the input and every weight. Each step of a layer is
followed by a step of the limit, as layer_benchmark pairs moekit's: times are medians over the
steps and pct_of_limit the median of the pairs' ratios.

At decode (T = 1, 4 and 16 with the standard shape's experts: names `pytorch/decode/<impl>/…`)
each forward follows a copy that leaves none of the weights in cache, as layer_benchmark's
decode steps follow a triad; counters experts_read and weight_GB_per_s (the experts' weights
read once, over the step's median time), as layer_benchmark's.

The output is JSON in Google Benchmark's layout (names `pytorch/<pass>/<impl>/<shape>/threads:N`
and `pytorch_limit/<pass>/<shape>/threads:N`, counters gflops and pct_of_limit), which
scripts/performance_report.py reads beside layer_benchmark's. Needs PyTorch, which moekit itself
never does: this script only measures the alternative.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [dict(T=2048, H=1024, F=2816, E=8, K=2), dict(T=2048, H=1024, F=256, E=64, K=2)]
DECODE_TOKENS = (1, 4, 16)  # the decode target's small batches, with the standard shape's experts
EVICTION_BYTES = 384 << 20  # as layer_benchmark's triad: no expert's weights stay in cache


def shape_name(s):
    return "/".join(f"{k}:{s[k]}" for k in ("T", "H", "F", "E", "K"))


def flops(s, backward):
    forward = 3 * 2.0 * s["T"] * s["K"] * s["H"] * s["F"]
    return forward * (3 if backward else 1)


class Weights:
    def __init__(self, s):
        E, H, Fd = s["E"], s["H"], s["F"]
        def param(*size):
            return (torch.randn(*size) * size[-1] ** -0.5).requires_grad_()
        self.router = param(E, H)
        self.gate = [param(Fd, H) for _ in range(E)]
        self.up = [param(Fd, H) for _ in range(E)]
        self.down = [param(H, Fd) for _ in range(E)]

    def expert(self, e, x):
        return F.linear(F.silu(F.linear(x, self.gate[e])) * F.linear(x, self.up[e]), self.down[e])


def route(w, x, k):
    probs = torch.softmax(F.linear(x, w.router), dim=-1, dtype=torch.float32)
    top, chosen = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), chosen


def hf_loop(w, x, s):
    weights, chosen = route(w, x, s["K"])
    out = torch.zeros_like(x)
    mask = F.one_hot(chosen, num_classes=s["E"]).permute(2, 1, 0)  # [E, K, T]
    for e in range(s["E"]):
        slot, token = torch.where(mask[e])
        if token.numel() == 0:
            continue
        y = w.expert(e, x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


def permute(w, x, s):
    weights, chosen = route(w, x, s["K"])
    order = torch.argsort(chosen.reshape(-1), stable=True)
    token = order // s["K"]
    counts = torch.bincount(chosen.reshape(-1), minlength=s["E"]).tolist()
    rows = x[token]
    outs = [w.expert(e, block) for e, block in enumerate(torch.split(rows, counts)) if block.shape[0] > 0]
    y = torch.cat(outs) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)


def limit(w, x, s):
    rows = x.repeat(s["K"], 1)  # T·K rows, one expert's weights, no routing
    return w.expert(0, rows)


def make_step(impl, s, backward):
    """One step of impl (forward, or forward and backward) on its own weights and input."""
    w = Weights(s)
    x = torch.randn(s["T"], s["H"], requires_grad=backward)

    def step():
        start = time.perf_counter()
        if backward:
            y = impl(w, x, s)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                impl(w, x, s)
        return time.perf_counter() - start
    return step


def paired(impl, limit_step, s, backward, pairs):
    """impl's steps, each followed by a step of the limit, as layer_benchmark pairs moekit's: the
    VM's speed drifts by 10-30% over minutes, and a pair sees the same machine. Returns the
    median of impl's steps and of limit / impl over the pairs."""
    step = make_step(impl, s, backward)
    step(), limit_step()  # warm-up
    times, ratios = [], []
    for _ in range(pairs):
        t = step()
        times.append(t)
        ratios.append(limit_step() / t)
    return statistics.median(times), statistics.median(ratios)


def decode(impls, w, s, steps):
    """Each layer's forward on T = s["T"] tokens with weights w, steps times, each after a copy
    through EVICTION_BYTES so that it reads the experts' weights from memory, as layer_benchmark's
    decode steps do after their triads. Yields (name, median seconds, experts read)."""
    x = torch.randn(s["T"], s["H"])
    source = torch.ones(EVICTION_BYTES // 8)
    target = torch.empty_like(source)
    experts = len(torch.unique(route(w, x, s["K"])[1]))
    with torch.no_grad():
        for name, impl in impls:
            impl(w, x, s)  # warm-up
            times = []
            for _ in range(steps):
                target.copy_(source)
                start = time.perf_counter()
                impl(w, x, s)
                times.append(time.perf_counter() - start)
            yield name, statistics.median(times), experts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=5,
                        help="timed steps of each layer, each followed by one of the limit (default: %(default)s)")
    parser.add_argument("--decode-steps", type=int, default=20,
                        help="timed steps of each layer at decode (default: %(default)s)")
    args = parser.parse_args(argv)
    benchmarks = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for s in SHAPES:
            for backward in (False, True):
                pass_ = "fwd+bwd" if backward else "fwd"
                tail = f"{shape_name(s)}/threads:{threads}"
                limit_step = make_step(limit, s, backward)
                limit_step()  # warm-up
                limit_s = statistics.median(limit_step() for _ in range(args.pairs))
                for name, impl in (("limit", None), ("hf_loop", hf_loop), ("permute", permute)):
                    t, ratio = (limit_s, 1.0) if impl is None else paired(impl, limit_step, s, backward, args.pairs)
                    benchmarks.append({
                        "name": f"pytorch_limit/{pass_}/{tail}" if impl is None else f"pytorch/{pass_}/{name}/{tail}",
                        "run_type": "iteration", "real_time": t * 1e3, "time_unit": "ms",
                        "gflops": flops(s, backward) * 1e-9 / t, "pct_of_limit": 100.0 * ratio,
                    })
                    print(benchmarks[-1]["name"], f"{t * 1e3:.1f} ms", f"{100.0 * ratio:.0f}% of limit",
                          file=sys.stderr)
        decode_weights = Weights(SHAPES[0])  # 277 MB: made once for the three batches
        for tokens in DECODE_TOKENS:
            s = dict(SHAPES[0], T=tokens)
            impls = (("hf_loop", hf_loop), ("permute", permute))
            for name, t, experts in decode(impls, decode_weights, s, args.decode_steps):
                weight_bytes = experts * 3 * s["H"] * s["F"] * 4
                benchmarks.append({
                    "name": f"pytorch/decode/{name}/{shape_name(s)}/threads:{threads}",
                    "run_type": "iteration", "real_time": t * 1e3, "time_unit": "ms",
                    "experts_read": experts, "weight_GB_per_s": weight_bytes * 1e-9 / t,
                })
                print(benchmarks[-1]["name"], f"{t * 1e3:.2f} ms", f"{experts} experts",
                      f"{weight_bytes * 1e-9 / t:.1f} GB/s", file=sys.stderr)
    context = {"library": f"torch {torch.__version__}", "num_cpus": torch.get_num_threads()}
    json.dump({"context": context, "benchmarks": benchmarks}, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
