#!/usr/bin/env python3
"""A deterministic mutation fuzzer for moekit's safetensors reader.

Mutates the files of a corpus (files the library wrote, and the Hugging Face fixtures) a fixed
number of times from a fixed seed, hands every mutant to the reader (safetensors_decode) and
holds what it makes of each against this script's own decoding, written from the format's
description and as strict as the reference implementation. The property: every input either
loads to exactly the tensors, bytes and metadata this decoding gives, or is refused with a
moekit::error; never another exception, never a crash.

    fuzz_safetensors.py DECODER CORPUS_DIR... [--mutants N] [--seed S]
"""
import argparse
import hashlib
import json
import os
import pathlib
import random
import struct
import subprocess
import sys
import tempfile

MAX_HEADER = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class Refused(Exception):
    pass


def fnv1a(data):
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Refused("duplicate member")
    return dict(pairs)


def refuse_constant(name):
    raise Refused("not JSON: " + name)


def check_strings(value):
    """A \\u escape of a lone surrogate is no character: refused, as the reference refuses it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("lone surrogate")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_strings(k)
            check_strings(v)
    elif isinstance(value, list):
        for v in value:
            check_strings(v)


def natural(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(data):
    """The file's metadata and tensors as the reader must give them, or Refused."""
    if len(data) < 8:
        raise Refused("short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER:
        raise Refused("header length")
    try:
        text = data[8 : 8 + n].decode("utf-8", errors="strict")
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Refused(str(e))
    check_strings(header)
    if not isinstance(header, dict):
        raise Refused("not an object")
    body = data[8 + n :]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Refused("metadata")
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise Refused("entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES or not isinstance(shape, list) or not all(natural(d) for d in shape):
            raise Refused("dtype or shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(natural(o) for o in offsets):
            raise Refused("offsets")
        if any(d >= 10**18 for d in shape) or any(o >= 10**18 for o in offsets):
            raise Refused("too large")
        begin, end = offsets
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        if size >= 2**62 or begin > end or end > len(body) or end - begin != size:
            raise Refused("size")
        tensors[name] = (dtype, shape, begin, end)
    covered = 0
    for dtype, shape, begin, end in sorted(tensors.values(), key=lambda t: (t[2], t[3])):
        if begin != covered:
            raise Refused("coverage")
        covered = end
    if covered != len(body):
        raise Refused("coverage")
    return metadata, {k: (t[0], t[1], body[t[2] : t[3]]) for k, t in tensors.items()}


def describe(metadata, tensors):
    """The line safetensors_decode prints for a file it loads."""
    def hexed(text):
        return text.encode("utf-8").hex() or "-"

    out = "ok"
    for key in sorted(metadata, key=lambda k: k.encode("utf-8")):
        out += " m:" + hexed(key) + ":" + hexed(metadata[key])
    for name in sorted(tensors, key=lambda k: k.encode("utf-8")):
        dtype, shape, raw = tensors[name]
        out += " t:%s:%s:[%s]:%d" % (hexed(name), dtype, ",".join(str(d) for d in shape), fnv1a(raw))
    return out


def mutate(data, rng):
    """One mutant of data: a few edits of the kinds that break files in the wild."""
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
        header_end = min(8 + n, len(data))
        kind = rng.randrange(9)
        if kind == 0 and len(data) > 8:  # the header length, a little off
            delta = rng.choice([-9, -3, -2, -1, 1, 2, 3, 8, 1 << 32])
            data[:8] = struct.pack("<Q", max(0, n + delta) % (1 << 64))
        elif kind == 1 and header_end > 8:  # a byte of the header flipped
            i = rng.randrange(8, header_end)
            data[i] ^= 1 << rng.randrange(8)
        elif kind == 2 and header_end > 8:  # a byte inserted into the header
            data.insert(rng.randrange(8, header_end), rng.choice(b' ,:"{}[]0123456789\\u'))
        elif kind == 3 and header_end > 9:  # a byte deleted from the header
            del data[rng.randrange(8, header_end)]
        elif kind == 4 and header_end > 8:  # a digit of the header changed
            digits = [i for i in range(8, header_end) if chr(data[i]).isdigit()]
            if digits:
                data[rng.choice(digits)] = ord(rng.choice("0123456789"))
        elif kind == 5:  # truncated
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == 6:  # bytes appended
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif kind == 7 and len(data) > header_end:  # a byte of the data flipped (it must load, changed)
            i = rng.randrange(header_end, len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif kind == 8 and header_end > 8:  # a span of the header repeated (a duplicate entry)
            i = rng.randrange(8, header_end)
            j = min(header_end, i + rng.randrange(1, 80))
            data[j:j] = data[i:j]
    return bytes(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder")
    parser.add_argument("corpus", nargs="+", type=pathlib.Path)
    parser.add_argument("--mutants", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    corpus = []
    for folder in args.corpus:
        corpus += sorted(folder.glob("*.safetensors"))
    if not corpus:
        sys.exit("no *.safetensors files in %s" % " ".join(map(str, args.corpus)))
    originals = [p.read_bytes() for p in corpus]
    # Small files take most of the mutants; each large one a share, so the run stays short.
    weights = [1.0 if len(o) < 100_000 else 0.1 for o in originals]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="moekit_fuzz_") as tmp:
        cases = [("%s (as written)" % p.name, o) for p, o in zip(corpus, originals)]
        for i in range(args.mutants):
            k = rng.choices(range(len(corpus)), weights)[0]
            cases.append(("%s, mutant %d" % (corpus[k].name, i), mutate(originals[k], rng)))
        paths = []
        for i, (_, data) in enumerate(cases):
            path = os.path.join(tmp, "%05d.safetensors" % i)
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        run = subprocess.run([args.decoder], input="\n".join(paths) + "\n", capture_output=True, text=True)
        lines = run.stdout.splitlines()
        if run.returncode != 0 or len(lines) != len(cases):
            sys.exit("the reader crashed or stopped (exit %d) after %d of %d files; stderr:\n%s"
                     % (run.returncode, len(lines), len(cases), run.stderr[-2000:]))
    failures, loaded, refused, stricter = [], 0, 0, 0
    for (name, data), line in zip(cases, lines):
        try:
            expected = describe(*decode(data))
        except Refused:
            expected = None
        if line.startswith("foreign"):
            failures.append("%s: an exception other than moekit::error: %s" % (name, line))
        elif line == "error":
            refused += 1
            stricter += expected is not None
        elif expected is None:
            failures.append("%s: loaded, where the reference decoding refuses it:\n  %s" % (name, line[:300]))
        elif line != expected:
            failures.append("%s: loaded differently:\n  moekit:    %s\n  reference: %s" % (name, line[:300], expected[:300]))
        else:
            loaded += 1
    for original, line in zip(corpus, lines):
        if not line.startswith("ok"):
            failures.append("%s: the corpus file itself did not load" % original.name)
    print("%d files: %d loaded as the reference decodes them, %d refused (%d of those the reference "
          "would load)" % (len(cases), loaded, refused, stricter))
    if failures:
        print("\n".join(failures[:20]))
        sys.exit("%d of %d files broke the property" % (len(failures), len(cases)))


if __name__ == "__main__":
    main()
