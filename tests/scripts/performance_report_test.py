"""scripts/performance_report.py on a small sample of layer_benchmark's JSON: the tables it
splices into a document, the verdicts against the targets, the plot, and its errors."""
import pathlib
import subprocess
import sys
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "performance_report.py"
SAMPLE = pathlib.Path(__file__).with_name("sample_benchmark.json")
PYTORCH = pathlib.Path(__file__).with_name("sample_pytorch.json")


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


class PerformanceReport(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.doc = pathlib.Path(self.dir.name) / "performance.md"
        self.doc.write_text("# Performance\n\nprose before\n\n<!-- report:begin -->\nold tables\n<!-- report:end -->\n\nprose after\n")

    def tearDown(self):
        self.dir.cleanup()

    def report(self):
        result = run(SAMPLE, "--machine", "test machine", "--command", "layer_benchmark --x", "--doc", self.doc)
        self.assertEqual(result.returncode, 0, result.stderr)
        return self.doc.read_text()

    def test_tables_replace_only_what_lies_between_the_markers(self):
        text = self.report()
        self.assertIn("prose before", text)
        self.assertIn("prose after", text)
        self.assertNotIn("old tables", text)
        self.assertIn("Machine: test machine", text)
        self.assertIn("layer_benchmark --x", text)
        self.assertEqual(text, self.report(), "running twice gives the same document")

    def test_layer_rows_carry_shape_limit_and_verdict(self):
        text = self.report()
        row = next(l for l in text.splitlines() if "| fwd | 2 |" in l and "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU`" in l)
        self.assertIn("`T:2048/H:1024/F:2816/E:8/K:2`", row)
        self.assertIn("| 1000 | 900 |", row, "the layer's and the limit's milliseconds (µs converted)")
        self.assertIn("| 90.0 | met |", row)
        backward = next(l for l in text.splitlines() if "| fwd+bwd | 2 |" in l)
        self.assertIn("| 3000 | 2250 |", backward, "the limit's steps timed beside the layer's (limit_ms)")
        self.assertIn("| 75.0 | **not met** | 1.19 |", backward)
        self.assertNotIn("real_time_mean", text, "aggregates are skipped")
        self.assertIn("The limit: oneDNN 2.6.3 matmul.", text, "the limit named from the run's context")

    def test_precision_table_pairs_f32_and_bf16(self):
        text = self.report()
        row = next(l for l in text.splitlines() if l.startswith("| `T:2048/H:1024/F:2816/E:8/K:2` | fwd | 2 |"))
        # f32: 69 GFLOP/s, 90% of a limit at 900 ms with no limit_ms (so no limit GFLOP/s); bf16: 138, its
        # limit 138 · 500/400, 80% (not met: 85), and twice as fast.
        self.assertIn("| 69.0 | — | 90.0 | bf16 | 138 | 172 | 80.0 | **not met** | 2.00 |", row)
        # i8: 276, its limit 276 · 250/200, 70% (not met: 75), four times as fast; forward only.
        i8 = next(l for l in text.splitlines() if "| i8 |" in l and l.startswith("| `T:2048"))
        self.assertIn("| fwd | 2 | 69.0 | — | 90.0 | i8 | 276 | 345 | 70.0 | **not met** | 4.00 |", i8)
        self.assertIn("![GFLOP/s by precision](performance_limit_precision.svg)", text)
        self.assertTrue((self.doc.parent / "performance_limit_precision.svg").exists())
        self.assertIn("`TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_bf16`", text, "the bf16 layer in the layer table")
        self.assertIn("`TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_i8`", text, "the i8 layer in the layer table")
        svg = (self.doc.parent / "performance_limit_precision.svg").read_text()
        self.assertEqual(svg.count("<rect"), 6, "each precision and its limit: f32, bf16 and i8 at two threads")

    def test_scaling_and_decode(self):
        text = self.report()
        self.assertRegex(text, r"\| layer \| `TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU` \| `T:2048/H:1024/F:2816/E:8/K:2` \| fwd \| 2 \| 1000 \| 2.00 \| 100% \|")
        self.assertRegex(text, r"\| limit \| +\| `T:2048/H:1024/F:2816/E:8/K:2` \| fwd \| 2 \| 900 \| 1.89 \| 94% \|")
        self.assertIn("| 4 | 2 | f32 | 7.50 | 5 | 2 | 23.0 | 41.0 | 3.40 | **not met** |", text)
        self.assertIn("| 4 | 2 | i8 | 2.00 | 5 | 2 | 21.6 | 41.0 | 1.25 | met |", text, "held to its own target, 1.3")
        self.assertIn("| 64 | 2 | f32 | 30.00 | 8 | 26 | 9.2 | 39.5 | 4.30 | — |", text, "past T = 16 shown, not held to the target")
        self.assertIn("2 threads 40.0 GB/s", text)
        self.assertRegex(text, r"\| fma \| +\| +\| +\| 2 \| 62.5 \| 1.60 \| 80% \|", "the cores' own multiply-adds")
        self.assertIn("| `TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU` | `T:2048/H:1024/F:2816/E:8/K:2` | fwd | 2 | 1100 | 1650 "
                      "| 75.0 | 90.0 | **not met** |", text, "parallel efficiency from paired steps")

    def test_one_thread_count_has_no_scaling_table(self):
        one = pathlib.Path(self.dir.name) / "one.json"
        one.write_text('{"benchmarks": [{"name": "limit/fwd/T:8/H:4/F:4/E:2/K:1/threads:4/real_time", '
                       '"run_type": "iteration", "real_time": 1.0, "time_unit": "ms", "gflops": 1.0}]}')
        result = run(one, "--machine", "m", "--command", "c", "--doc", self.doc)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("### Thread scaling", self.doc.read_text(), "no speed-up without a one-thread run")
        self.assertIn("### Thread scaling", self.report())

    def test_plot(self):
        self.report()
        svg = (self.doc.parent / "performance_limit.svg").read_text()
        self.assertTrue(svg.startswith("<svg"))
        self.assertEqual(svg.count("<rect"), 4, "one bar per layer benchmark (f32, bf16, i8) and pass, at its most threads")
        self.assertIn("90%", svg)

    def test_pytorch_rows_are_held_to_both_limits_and_to_moekit(self):
        result = run(SAMPLE, PYTORCH, "--machine", "m", "--command", "c", "--doc", self.doc)
        self.assertEqual(result.returncode, 0, result.stderr)
        text = self.doc.read_text()
        self.assertIn("### PyTorch on the same machine", text)
        # 1500 / 2000 of its own limit, 900 / 2000 of Eigen's, moekit's 1000 ms: 2× faster.
        self.assertIn("| hf_loop | `T:2048/H:1024/F:2816/E:8/K:2` | fwd | 2 | 2000 | 75.0 | 45.0 | 1000 | 2.00× |", text)
        # With pct_of_limit from its paired steps, that, not the ratio of the medians.
        self.assertIn("| permute | `T:2048/H:1024/F:2816/E:8/K:2` | fwd | 2 | 2000 | 80.0 | 45.0 | 1000 | 2.00× |", text)
        # At decode, held to moekit's decode step of the same T and threads by the rate each reads
        # its experts' weights (23 GB/s over 10): its five experts against PyTorch's six.
        self.assertIn("| hf_loop | 4 | 2 | 20.00 | 6 | 10.0 | 7.50 | 5 | 23.0 | 2.30× |", text)
        self.assertEqual(text.count("| hf_loop |"), 2, "a decode row apart from the fwd and fwd+bwd table")
        self.assertNotIn("PyTorch on the same machine", self.report(), "no PyTorch table without its JSON")

    def test_sections_keep_several_machines_in_one_document(self):
        self.doc.write_text("<!-- report:a:begin -->\n<!-- report:a:end -->\nmiddle\n"
                            "<!-- report:b:begin -->\nold b\n<!-- report:b:end -->\n")
        for section, machine in (("a", "machine A"), ("b", "machine B")):
            result = run(SAMPLE, "--machine", machine, "--command", "c", "--doc", self.doc, "--section", section)
            self.assertEqual(result.returncode, 0, result.stderr)
        text = self.doc.read_text()
        self.assertLess(text.index("machine A"), text.index("middle"))
        self.assertLess(text.index("middle"), text.index("machine B"))
        self.assertNotIn("old b", text)
        result = run(SAMPLE, "--machine", "m", "--command", "c", "--doc", self.doc, "--section", "c")
        self.assertIn("<!-- report:c:begin -->", result.stderr)

    def test_errors_name_what_was_expected(self):
        self.doc.write_text("no markers\n")
        result = run(SAMPLE, "--machine", "m", "--command", "c", "--doc", self.doc)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("expected both", result.stderr)
        empty = pathlib.Path(self.dir.name) / "empty.json"
        empty.write_text('{"benchmarks": []}')
        result = run(empty, "--machine", "m", "--command", "c", "--doc", self.doc)
        self.assertIn("has no benchmark results", result.stderr)
        broken = pathlib.Path(self.dir.name) / "broken.json"
        broken.write_text('{"benchmarks": [')
        result = run(broken, "--machine", "m", "--command", "c", "--doc", self.doc)
        self.assertIn("expected Google Benchmark JSON", result.stderr)


if __name__ == "__main__":
    unittest.main()
