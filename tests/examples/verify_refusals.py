"""moekit-verify refuses, by the metadata key's name and value, a fixture whose conventions
moekit does not implement: each case rewrites mixtral.safetensors' metadata and expects exit
status 2 and the key = 'value' in the message.

    verify_refusals.py MOEKIT_VERIFY FIXTURES_DIR
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

CASES = [  # metadata changes → what the message must name
    ({"layout_from": "gu_interleaved"}, "layout_from = 'gu_interleaved'"),
    ({"shared_expert": "gelu, unscaled"}, "shared_expert = 'gelu, unscaled'"),
    ({"n_group": "4", "topk_group": "2", "group_score": "mean score in group"},
     "group_score = 'mean score in group'"),
    ({"router_bias": "added to the logits"}, "router_bias = 'added to the logits'"),
    ({"selection_bias": "router.bias added to the weights"}, "selection_bias = 'router.bias added to the weights'"),
]


def rewrite(source, target, changes):
    data = open(source, "rb").read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    open(target, "wb").write(struct.pack("<Q", len(text)) + text + data[8 + size:])


def main():
    verify, fixtures = sys.argv[1], sys.argv[2]
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for i, (changes, expected) in enumerate(CASES):
            path = os.path.join(folder, f"case{i}.safetensors")
            rewrite(os.path.join(fixtures, "mixtral.safetensors"), path, changes)
            run = subprocess.run([verify, path], capture_output=True, text=True)
            if run.returncode != 2 or expected not in run.stderr:
                failures += 1
                print(f"FAIL {changes}: exit {run.returncode}, stderr {run.stderr!r}; expected 2 and {expected!r}")
            else:
                print(f"ok   {expected}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
