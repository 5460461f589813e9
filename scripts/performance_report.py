#!/usr/bin/env python3
"""Turns layer_benchmark's JSON into the measured part of docs/performance.md, and a plot.

    build/benchmarks/layer_benchmark --benchmark_format=json > bench.json
    python3 scripts/performance_report.py bench.json [pytorch.json …] \\
        --machine "2-vCPU VM, AMD EPYC, 24 GiB, Debian 12, g++ 12.2 -O3" \\
        --command "build/benchmarks/layer_benchmark --benchmark_format=json"

Several JSON files are read as one run (say, two filters of the same binary, and
scripts/pytorch_baseline.py's output from the same machine). The tables replace what lies
between the markers `<!-- report:begin -->` and `<!-- report:end -->` in the document
(docs/performance.md by default), or `<!-- report:NAME:begin -->` … with --section NAME, so one
document holds several machines; the prose around them stays. The plot (pct_of_limit of every
layer benchmark, with the targets) is an SVG written beside the document. Python's standard
library only.
"""
import argparse
import html
import json
import pathlib
import re
import sys


def markers(section):
    name = f"report:{section}:" if section else "report:"
    return f"<!-- {name}begin -->", f"<!-- {name}end -->"

TARGETS = {"fwd": 85.0, "fwd+bwd": 80.0}  # percent of the limit (the targets of docs/performance.md)
EFFICIENCY_TARGET = 80.0  # parallel efficiency, percent (the target at 16 threads)
DECODE_TARGETS = {"f32": 1.5, "bf16": 1.3, "i8": 1.3}  # x_of_bound, by precision
DECODE_MAX_TOKENS = 16  # the decode target: T = 1 … 16
DEFAULT_LAYER = "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU"


def parse_name(name):
    """'layer/fwd/<policies>/T:2048/H:1024/F:2816/E:8/K:2/threads:2/manual_time' → dict."""
    parts = [p for p in name.split("/") if p not in ("real_time", "manual_time", "") and not p.startswith("iterations:")]
    entry = {"kind": parts[0], "pass": None, "policies": None, "shape": {}, "threads": None}
    for part in parts[1:]:
        key, sep, value = part.partition(":")
        if sep and key in ("T", "H", "F", "E", "K"):
            entry["shape"][key] = int(value)
        elif sep and key == "threads":
            entry["threads"] = int(value)
        elif part in ("fwd", "fwd+bwd") or (part == "decode" and parts[0] == "pytorch"):
            entry["pass"] = part
        else:
            entry["policies"] = part
    return entry


def shape_name(shape):
    return "/".join(f"{k}:{shape[k]}" for k in ("T", "H", "F", "E", "K") if k in shape)


def short_policies(policies):
    return re.sub(r"_SingleProcess(_f32$|(?=_(bf16|i8)$))", "", policies or "")


def precision_of(policies):
    """'…_f32' → 'f32', '…_bf16' → 'bf16', '…_i8' → 'i8': the scalar, or the experts' precision."""
    return (policies or "").rsplit("_", 1)[-1]


# Percent of the oneDNN limit in the layer's own precision, per pass; the counter that says whether
# the limit computed in it.
PRECISION_TARGETS = {"bf16": {"fwd": 85.0, "fwd+bwd": 80.0}, "i8": {"fwd": 75.0}}
PRECISION_LIMIT_COUNTER = {"bf16": "limit_in_bf16", "i8": "limit_in_int8"}


def limit_gflops(r):
    """The paired limit's GFLOP/s: the layer's, scaled by the layer's time over the limit's."""
    c = r["counters"]
    if "gflops" not in c or not c.get("limit_ms"):
        return None
    return c["gflops"] * r["ms"] / c["limit_ms"]


def precision_pairs(rows):
    """(key, f32 row, precision, its row) for each layer, shape, pass and thread count run in f32 and
    in another precision (bf16, i8)."""
    layers = [r for r in rows if r["kind"] == "layer"]
    by_key = {}
    for r in layers:
        base = re.sub(r"_(f32|bf16|i8)$", "", r["policies"] or "")
        by_key.setdefault((base, shape_name(r["shape"]), r["pass"], r["threads"]), {})[precision_of(r["policies"])] = r
    return [(key, p["f32"], name, p[name]) for key, p in sorted(by_key.items()) if "f32" in p
            for name in PRECISION_TARGETS if name in p]


def precision_table(rows):
    """Each layer run in f32 and in another precision: GFLOP/s, each against its own limit, and
    what the precision buys."""
    lines = []
    for (base, shape, pass_, threads), f32, name, other in precision_pairs(rows):
        in_own = other["counters"].get(PRECISION_LIMIT_COUNTER[name], 0) == 1
        pct = other["counters"].get("pct_of_limit")
        target = PRECISION_TARGETS[name].get(pass_)
        lines.append([
            f"`{shape}`", pass_, threads,
            fmt(f32["counters"].get("gflops")), fmt(limit_gflops(f32)), fmt(f32["counters"].get("pct_of_limit")),
            name, fmt(other["counters"].get("gflops")), fmt(limit_gflops(other)) + ("" if in_own else " (f32)"),
            fmt(pct),
            (verdict(pct, target) if target else "—") if in_own else f"— (no {name} limit)",
            fmt(f32["ms"] / other["ms"], 2),
        ])
    if not lines:
        return ""
    return table(["shape", "pass", "threads", "f32 GFLOP/s", "f32 limit", "f32 % of limit", "precision", "GFLOP/s",
                  "its limit", "% of its limit", "target (bf16: fwd ≥ 85, fwd+bwd ≥ 80; i8: fwd ≥ 75)",
                  "speed-up over f32"], lines)


PRECISION_COLOURS = {"f32": "#3a7bd5", "bf16": "#e08a2c", "i8": "#4caf50"}


def precision_plot(rows, path):
    """Grouped bars: GFLOP/s of each precision and of its limit, per shape and pass, at the largest
    thread count."""
    pairs = precision_pairs(rows)
    if not pairs:
        return False
    most = max(key[3] for key, _, _, _ in pairs)
    groups = {}  # (shape, pass) → {precision: row}, in the order met
    for (base, shape, pass_, threads), f32, name, other in pairs:
        if threads == most:
            groups.setdefault(f"{shape} {pass_}", {"f32": f32})[name] = other
    bars = []  # (label, GFLOP/s, colour)
    for label, by_precision in groups.items():
        bars.append((label, None, None))
        for name, r in by_precision.items():
            bars.append((f"  {name}", r["counters"].get("gflops", 0.0), PRECISION_COLOURS[name]))
            bars.append((f"  {name} limit", limit_gflops(r) or 0.0, "#bbbbbb"))
    top_value = max(v for _, v, _ in bars if v is not None) or 1.0
    label_w, bar_w, row_h, top = 300, 420, 16, 40
    width, height = label_w + bar_w + 80, top + row_h * len(bars) + 20
    scale = bar_w / (1.1 * top_value)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="20" font-size="13">GFLOP/s (int8: GOP/s) by precision, layer and its limit (threads: {most})</text>']
    for i, (label, value, colour) in enumerate(bars):
        y = top + i * row_h
        svg.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{html.escape(label)}</text>')
        if value is not None:
            svg.append(f'<rect x="{label_w}" y="{y + 2}" width="{value * scale:.1f}" height="{row_h - 4}" fill="{colour}"/>')
            svg.append(f'<text x="{label_w + value * scale + 4:.1f}" y="{y + 11}">{value:.0f}</text>')
    svg.append("</svg>")
    pathlib.Path(path).write_text("\n".join(svg) + "\n")
    return True


def milliseconds(bench):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[bench.get("time_unit", "ns")]
    return bench["real_time"] * scale


def load_all(paths):
    """Rows of every file; the context of the first."""
    context, rows = {}, []
    for path in paths:
        file_context, file_rows = load(path)
        context = context or file_context
        rows += file_rows
    return context, rows


def load(path):
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"performance_report: cannot read '{path}' ({e}); expected Google Benchmark JSON")
    rows = []
    for bench in data.get("benchmarks", []):
        if bench.get("run_type", "iteration") != "iteration" or bench.get("error_occurred"):
            continue
        entry = parse_name(bench["name"])
        entry["ms"] = milliseconds(bench)
        entry["counters"] = {k: v for k, v in bench.items() if isinstance(v, (int, float))}
        rows.append(entry)
    return data.get("context", {}), rows


def fmt(value, digits=1):
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def verdict(value, target, higher_is_better=True):
    if value is None:
        return "—"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**not met**"


def layer_tables(rows):
    layers = [r for r in rows if r["kind"] == "layer"]
    limits = {(shape_name(r["shape"]), r["pass"], r["threads"]): r for r in rows if r["kind"] == "limit"}
    lines = []
    for r in sorted(layers, key=lambda r: (shape_name(r["shape"]), short_policies(r["policies"]), r["pass"], r["threads"])):
        c = r["counters"]
        # The limit's steps timed beside the layer's; else the limit's own benchmark.
        limit = limits.get((shape_name(r["shape"]), r["pass"], r["threads"]))
        limit_ms = c.get("limit_ms", limit["ms"] if limit else None)
        lines.append([
            f"`{short_policies(r['policies'])}`", f"`{shape_name(r['shape'])}`", r["pass"], r["threads"],
            fmt(r["ms"]), fmt(limit_ms), fmt(c.get("gflops")),
            fmt(c.get("pct_of_limit")), verdict(c.get("pct_of_limit"), TARGETS[r["pass"]]),
            fmt(c.get("peak_over_saved"), 2) if "peak_over_saved" in c else "",
            fmt(c.get("allocs_per_step"), 0),
        ])
    return table(["layer", "shape", "pass", "threads", "ms", "limit ms", "GFLOP/s", "% of limit",
                  "target (fwd ≥ 85, fwd+bwd ≥ 80)", "peak / saved", "allocs / step"], lines)


def scaling_table(rows):
    """Speed-up over one thread of every layer, limit (by shape and pass) and of the cores' own
    multiply-adds (fma: the most a compute-bound product can scale to on the machine)."""
    by_key = {}
    for r in rows:
        if r["kind"] in ("layer", "limit", "fma"):
            key = (r["kind"], short_policies(r["policies"]), shape_name(r["shape"]), r["pass"])
            by_key.setdefault(key, {})[r["threads"]] = r["ms"]
    lines = []
    for (kind, policies, shape, pass_), times in sorted(by_key.items()):
        if 1 not in times or len(times) < 2:
            continue
        for threads in sorted(times):
            speedup = times[1] / times[threads]
            lines.append([kind, f"`{policies}`" if policies else "", f"`{shape}`" if shape else "", pass_ or "", threads,
                          fmt(times[threads]), fmt(speedup, 2), f"{100 * speedup / threads:.0f}%"])
    if not lines:
        return None
    return table(["", "layer", "shape", "pass", "threads", "ms", "speed-up", "parallel efficiency"], lines)


def paired_scaling_table(rows):
    """Parallel efficiency from paired steps (`scaling/...`), with the cores' multiply-adds' beside it."""
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "scaling"),
                    key=lambda r: (shape_name(r["shape"]), short_policies(r["policies"]), r["pass"], r["threads"])):
        c = r["counters"]
        lines.append([f"`{short_policies(r['policies'])}`", f"`{shape_name(r['shape'])}`", r["pass"], r["threads"],
                      fmt(r["ms"]), fmt(c.get("one_thread_ms")), fmt(c.get("parallel_efficiency")),
                      fmt(c.get("fma_efficiency")), verdict(c.get("parallel_efficiency"), EFFICIENCY_TARGET)])
    if not lines:
        return None
    return table(["layer", "shape", "pass", "threads", "ms", "one thread, ms", "parallel efficiency %",
                  "multiply-adds' efficiency %", f"target (≥ {EFFICIENCY_TARGET:.0f})"], lines)


def decode_table(rows):
    """Held to the target up to DECODE_MAX_TOKENS; larger batches are shown for the kernel's range."""
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "decode"),
                    key=lambda r: (r["threads"], r["shape"]["T"], list(DECODE_TARGETS).index(precision_of(r["policies"])))):
        c = r["counters"]
        held = r["shape"]["T"] <= DECODE_MAX_TOKENS
        target = DECODE_TARGETS[precision_of(r["policies"])]
        lines.append([r["shape"]["T"], r["threads"], precision_of(r["policies"]), fmt(r["ms"], 2),
                      fmt(c.get("experts_read"), 0), fmt(c.get("most_rows"), 0), fmt(c.get("weight_GB_per_s")),
                      fmt(c.get("triad_GB_per_s")), fmt(c.get("x_of_bound"), 2),
                      verdict(c.get("x_of_bound"), target, higher_is_better=False) if held else "—"])
    triads = ", ".join(f"{r['threads']} thread{'' if r['threads'] == 1 else 's'} {fmt(r['counters'].get('GB_per_s'))} GB/s"
                       for r in rows if r["kind"] == "triad")
    targets = ", ".join(f"{name} ≤ {target}" for name, target in DECODE_TARGETS.items())
    header = ["T", "threads", "precision", "ms", "experts read", "most rows", "weights GB/s", "paired triads GB/s",
              "x_of_bound", f"target ({targets}; T ≤ {DECODE_MAX_TOKENS})"]
    return table(header, lines) + (f"\n\nTriad bandwidth, best of 5 on their own: {triads}. x_of_bound compares each step "
                                          "with the triad run right after it (their mean: paired triads), the weights "
                                          "counted in the layer's precision (bf16: 2 bytes a weight; i8: 1, with its "
                                          "scales)." if triads else "")


def pytorch_table(rows):
    """PyTorch's layers against its own limit, moekit's limit and moekit's default layer."""
    def key(r):
        return (shape_name(r["shape"]), r["pass"], r["threads"])
    own = {key(r): r for r in rows if r["kind"] == "pytorch_limit"}
    limit = {key(r): r for r in rows if r["kind"] == "limit"}
    ours = {key(r): r for r in rows if r["kind"] == "layer" and short_policies(r["policies"]) == DEFAULT_LAYER}
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "pytorch" and r["pass"] != "decode"),
                    key=lambda r: (key(r), r["policies"])):
        k = key(r)
        lines.append([
            r["policies"], f"`{k[0]}`", k[1], k[2], fmt(r["ms"]),
            fmt(r["counters"]["pct_of_limit"]) if "pct_of_limit" in r["counters"]  # from paired steps
            else fmt(100 * own[k]["ms"] / r["ms"]) if k in own else "—",
            fmt(100 * limit[k]["ms"] / r["ms"]) if k in limit else "—",
            fmt(ours[k]["ms"]) if k in ours else "—",
            f"{r['ms'] / ours[k]['ms']:.2f}×" if k in ours else "—",
        ])
    if not lines:
        return None
    return table(["PyTorch layer", "shape", "pass", "threads", "ms", "% of PyTorch's limit",
                  "% of moekit's limit", "moekit ms", "moekit speed-up"], lines)


def pytorch_decode_table(rows):
    """PyTorch's layers at decode against moekit's default layer: the rate each reads its experts'
    weights at, which compares them whatever experts their tokens chose."""
    def key(r):
        return (shape_name(r["shape"]), r["threads"])
    ours = {key(r): r for r in rows if r["kind"] == "decode" and short_policies(r["policies"]) == DEFAULT_LAYER}
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "pytorch" and r["pass"] == "decode"),
                    key=lambda r: (r["threads"], r["shape"]["T"], r["policies"])):
        c, o = r["counters"], ours.get(key(r))
        rate, own_rate = c.get("weight_GB_per_s"), o["counters"].get("weight_GB_per_s") if o else None
        lines.append([r["policies"], r["shape"]["T"], r["threads"], fmt(r["ms"], 2), fmt(c.get("experts_read"), 0),
                      fmt(rate), fmt(o["ms"], 2) if o else "—",
                      fmt(o["counters"].get("experts_read"), 0) if o else "—", fmt(own_rate),
                      f"{own_rate / rate:.2f}×" if rate and own_rate else "—"])
    if not lines:
        return None
    return table(["PyTorch layer", "T", "threads", "ms", "experts read", "weights GB/s", "moekit ms",
                  "moekit experts read", "moekit weights GB/s", "moekit speed-up (GB/s)"], lines)


def plot(rows, path):
    """Horizontal bars: pct_of_limit of each layer benchmark at its largest thread count."""
    layers = [r for r in rows if r["kind"] == "layer"]
    if not layers:
        return False
    most = {}
    for r in layers:
        key = (short_policies(r["policies"]), shape_name(r["shape"]), r["pass"])
        if key not in most or r["threads"] > most[key]["threads"]:
            most[key] = r
    bars = sorted(most.values(), key=lambda r: (shape_name(r["shape"]), short_policies(r["policies"]), r["pass"]))
    label_w, bar_w, row_h, top = 560, 360, 18, 40
    width, height = label_w + bar_w + 60, top + row_h * len(bars) + 40
    scale = bar_w / 120.0  # 0 … 120 %
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="20" font-size="13">Layer speed, % of the limit (threads: {max(r["threads"] for r in bars)})</text>']
    for i, r in enumerate(bars):
        y = top + i * row_h
        pct = r["counters"].get("pct_of_limit", 0.0)
        color = "#3a7bd5" if r["pass"] == "fwd" else "#e08a2c"
        label = f'{short_policies(r["policies"])} {shape_name(r["shape"])} {r["pass"]}'
        svg.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{html.escape(label)}</text>')
        svg.append(f'<rect x="{label_w}" y="{y + 2}" width="{max(0.0, pct) * scale:.1f}" height="{row_h - 4}" fill="{color}"/>')
        svg.append(f'<text x="{label_w + max(0.0, pct) * scale + 4:.1f}" y="{y + 12}">{pct:.0f}%</text>')
    for pass_, target in TARGETS.items():
        x = label_w + target * scale
        svg.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 30}" stroke="#555" stroke-dasharray="4 3"/>')
        svg.append(f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle">{pass_} target {target:.0f}%</text>')
    svg.append("</svg>")
    pathlib.Path(path).write_text("\n".join(svg) + "\n")
    return True


def report(context, rows, machine, command, plot_name, precision_plot_name=None):
    caches = ", ".join(f"L{c['level']} {c['type'].lower()} {c['size'] // 1024} KiB"
                       for c in context.get("caches", []) if c.get("type") in ("Data", "Unified"))
    parts = [
        f"Machine: {machine}. Google Benchmark saw {context.get('num_cpus', '?')} CPUs at "
        f"{context.get('mhz_per_cpu', '?')} MHz{f' ({caches})' if caches else ''}; run {context.get('date', '?')}.",
        "", "```", command, "```", "",
        "### Against the limit", "", layer_tables(rows), "",
        f"The limit: {context.get('limit', 'Eigen GEMM')}. "
        "% of limit compares GFLOP/s, step by step: each step of the layer is followed by one of the "
        "limit, and the median of their ratios is given; limit ms is the mean of those limit steps. "
        "The limit is SwiGLU's three GEMMs, so a GeLU or ReLU layer (two GEMMs) takes less time than "
        "the limit while its % of limit stays below 100.", "",
        f"![% of the limit per layer benchmark]({plot_name})" if plot_name else "", "",
    ]
    precision = precision_table(rows)
    if precision:
        parts += ["### By precision", "", precision, "",
                  "Each precision against its own limit: oneDNN's matmul on f32 operands, on bf16 operands "
                  "with float sums, or on u8 rows and s8 weights with int32 sums (i8: forward only; a limit "
                  "marked (f32) is the float one: this build found no oneDNN). i8 GFLOP/s counts each "
                  "multiply-add as two operations, as the float rates do. Speed-up is the f32 layer's time "
                  "over the other's.", "",
                  f"![GFLOP/s by precision]({precision_plot_name})" if precision_plot_name else "", ""]
    scaling, paired = scaling_table(rows), paired_scaling_table(rows)
    if scaling or paired:
        parts += ["### Thread scaling", ""]
    if scaling:
        parts += [scaling, ""]
    if paired:
        parts += ["From paired steps: each step on N threads followed by the same step on one thread, then "
                  "the cores' multiply-adds on N threads and on one; the medians over the steps of one-thread "
                  "time / (N × N-thread time), so both see the same machine.", "", paired, ""]
    parts += ["### Decode (small batches)", "", decode_table(rows)]
    torch, torch_decode = pytorch_table(rows), pytorch_decode_table(rows)
    if torch or torch_decode:
        parts += ["", "### PyTorch on the same machine", ""]
    if torch:
        parts += [torch, ""]
    if torch_decode:
        parts += ["At decode, each step after a copy that leaves none of the weights in cache; speed-up is "
                  "moekit's rate of reading its experts' weights over PyTorch's, so that steps whose tokens "
                  "chose different experts compare.", "", torch_decode]
    return "\n".join(parts).replace("\n\n\n", "\n\n").strip() + "\n"


def splice(document, generated, section=None):
    begin, end = markers(section)
    if begin not in document or end not in document:
        raise SystemExit(f"performance_report: the document has no {begin} … {end} markers; expected both")
    head, rest = document.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{generated}{end}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="layer_benchmark --benchmark_format=json output (several: one run)")
    parser.add_argument("--machine", required=True, help="the machine, in words (CPU, memory, OS, compiler)")
    parser.add_argument("--command", required=True, help="the command the JSON came from")
    parser.add_argument("--doc", default="docs/performance.md", help="document to update (default: %(default)s)")
    parser.add_argument("--plot", default="performance_limit.svg", help="SVG file name, beside the document")
    parser.add_argument("--section", help="fill <!-- report:SECTION:begin/end --> instead of <!-- report:begin/end -->")
    args = parser.parse_args(argv)

    context, rows = load_all(args.json)
    if not rows:
        raise SystemExit(f"performance_report: {', '.join(args.json)} has no benchmark results; expected layer_benchmark's JSON")
    doc = pathlib.Path(args.doc)
    document = doc.read_text()
    splice(document, "", args.section)  # check the markers before writing anything
    plot_name = args.plot if plot(rows, doc.parent / args.plot) else None
    precision_name = re.sub(r"(\.svg)?$", "_precision.svg", args.plot, count=1)
    precision_name = precision_name if precision_plot(rows, doc.parent / precision_name) else None
    doc.write_text(splice(document, report(context, rows, args.machine, args.command, plot_name, precision_name),
                          args.section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
