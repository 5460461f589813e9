"""scripts/compile_cost.py with a stand-in compiler that, like g++ with its cc1plus, leaves the
work to a child process: every file is compiled as the table says, the child's memory is counted,
and a compiler that fails stops the script with its message."""
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_cost.py"

# Logs its arguments, then runs a child that holds about 80 MB for a moment.
FAKE_COMPILER = """#!{python}
import subprocess, sys, pathlib
with open(pathlib.Path(__file__).with_name("calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if any("FAIL" in a for a in sys.argv):
    sys.exit("stand-in: cannot compile")
subprocess.run([sys.executable, "-c", "import time; b = bytearray(80 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.05)"], check=True)
"""


class CompileCost(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.compiler = pathlib.Path(self.dir.name) / "cxx"
        self.compiler.write_text(FAKE_COMPILER.format(python=sys.executable))
        self.compiler.chmod(0o755)

    def tearDown(self):
        self.dir.cleanup()

    def run_script(self, *extra):
        return subprocess.run([sys.executable, str(SCRIPT), "--cxx", str(self.compiler), *extra],
                              capture_output=True, text=True)

    def test_every_file_compiled_and_its_childs_memory_counted(self):
        result = self.run_script("--flags=-O1 -g")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()[2:]]
        self.assertEqual([r[0] for r in rows], ["include_only.cpp", "layer_forward.cpp", "layer_forward.cpp",
                                                "moekit/compiled_kernels.cpp"])
        for row in rows:
            self.assertGreaterEqual(float(row[-1]), 80, row)  # peak MB: the child's 80 MB
        calls = (pathlib.Path(self.dir.name) / "calls.log").read_text().splitlines()
        self.assertEqual(len(calls), 4)
        self.assertTrue(all("-std=c++20 -O1 -g" in c for c in calls), calls)
        self.assertEqual(["-DMOEKIT_COMPILED_KERNELS" in c for c in calls], [False, False, True, False])
        self.assertTrue(calls[3].endswith("include/moekit/compiled_kernels.cpp"), calls[3])

    def test_a_failed_compile_stops_with_the_compilers_message(self):
        result = self.run_script("--flags=-DFAIL")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("compile_cost: failed", result.stderr)
        self.assertIn("stand-in: cannot compile", result.stderr)


if __name__ == "__main__":
    unittest.main()
