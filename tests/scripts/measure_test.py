"""scripts/measure.sh with a stand-in for layer_benchmark that logs its arguments and prints a
sample of its JSON: the two runs it makes, the section and plot it writes, the command it
reports, and its errors; and with one for a Python that has PyTorch, the baseline's run."""
import os
import pathlib
import shlex
import subprocess
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "measure.sh"
SAMPLE = pathlib.Path(__file__).with_name("sample_benchmark.json")
PYTORCH_SAMPLE = pathlib.Path(__file__).with_name("sample_pytorch.json")

# The standard shape, triad and decode come from the sample; the matrix run gets no benchmarks.
FAKE_BENCHMARK = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
  *T:2048*) cat {sample} ;;
  *) printf '{{"context": {{"date": "2026-01-01T00:00:00+00:00", "num_cpus": 2, "mhz_per_cpu": 2000, "caches": []}}, "benchmarks": []}}\\n' ;;
esac
"""

# A stand-in for a Python with PyTorch: logs what it was asked to run, prints a sample of its JSON.
FAKE_PYTORCH = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/pytorch_calls.log"
cat {sample}
"""


class Measure(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        base = pathlib.Path(self.dir.name)
        self.build = base / "build"
        (self.build / "benchmarks").mkdir(parents=True)
        self.bench = self.build / "benchmarks" / "layer_benchmark"
        self.bench.write_text(FAKE_BENCHMARK.format(sample=shlex.quote(str(SAMPLE))))
        self.bench.chmod(0o755)
        self.doc = base / "docs" / "performance.md"
        self.doc.parent.mkdir()
        self.doc.write_text("# Performance\n\n"
                            "<!-- report:test-core:begin -->\nold\n<!-- report:test-core:end -->\n\nafter\n")
        self.out = base / "json"

    def tearDown(self):
        self.dir.cleanup()

    def measure(self, *args, **env_added):
        env = {name: value for name, value in os.environ.items() if name != "MEASURE_PYTORCH"}
        env.update(MEASURE_DOC=str(self.doc), MEASURE_OUT=str(self.out), **env_added)
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)

    def test_runs_both_benchmarks_and_writes_the_section_and_plot(self):
        result = self.measure("test-core", "a test machine", str(self.build))
        self.assertEqual(result.returncode, 0, result.stderr)
        calls = (self.build / "benchmarks" / "calls.log").read_text().splitlines()
        # All the cores, counted as the script counts them.
        cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        self.assertEqual(calls, ["--benchmark_filter=T:2048|triad|fma|decode --benchmark_format=json",
                                 f"--threads={cores} --benchmark_filter=T:512 --benchmark_format=json"])
        self.assertTrue((self.out / "scaling.json").exists() and (self.out / "matrix.json").exists())
        text = self.doc.read_text()
        self.assertNotIn("old", text)
        self.assertIn("after", text)
        self.assertIn("Machine: a test machine", text)
        # The reported command is the one that ran, quoted so that it can be pasted into a shell.
        self.assertIn(f"{self.bench} '--benchmark_filter=T:2048|triad|fma|decode' --benchmark_format=json; "
                      f"{self.bench} '--threads={cores}' '--benchmark_filter=T:512' --benchmark_format=json", text)
        self.assertIn("performance_limit_testcore.svg", text)
        self.assertTrue((self.doc.parent / "performance_limit_testcore.svg").exists())

    def test_pytorch_runs_where_a_python_with_it_is_named(self):
        self.assertNotIn("PyTorch", self.doc.read_text())
        python = self.build / "python_with_torch"
        python.write_text(FAKE_PYTORCH.format(sample=shlex.quote(str(PYTORCH_SAMPLE))))
        python.chmod(0o755)
        result = self.measure("test-core", "a test machine", str(self.build), MEASURE_PYTORCH=str(python))
        self.assertEqual(result.returncode, 0, result.stderr)
        cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        calls = (self.build / "pytorch_calls.log").read_text().splitlines()
        self.assertEqual(calls, [f"scripts/pytorch_baseline.py --threads 1,{cores}"])
        self.assertTrue((self.out / "pytorch.json").exists())
        text = self.doc.read_text()
        self.assertIn("### PyTorch on the same machine", text)
        self.assertIn(f"{python} scripts/pytorch_baseline.py --threads 1,{cores}", text)

    def test_without_a_python_named_pytorch_is_not_run(self):
        result = self.measure("test-core", "a test machine", str(self.build))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse((self.out / "pytorch.json").exists())
        self.assertNotIn("PyTorch", self.doc.read_text())

    def test_a_section_without_markers_is_refused_before_anything_runs(self):
        result = self.measure("no-such", "m", str(self.build))
        self.assertEqual(result.returncode, 1)
        self.assertIn("has no <!-- report:no-such:begin --> marker", result.stderr)
        self.assertFalse((self.build / "benchmarks" / "calls.log").exists())

    def test_a_build_without_the_benchmark_is_named(self):
        result = self.measure("test-core", "m", str(self.build / "elsewhere"))
        self.assertEqual(result.returncode, 1)
        self.assertIn("no " + str(self.build / "elsewhere" / "benchmarks" / "layer_benchmark"), result.stderr)

    def test_too_few_arguments_print_the_usage(self):
        result = self.measure("test-core")
        self.assertEqual(result.returncode, 2)
        self.assertIn("scripts/measure.sh SECTION", result.stderr)


if __name__ == "__main__":
    unittest.main()
