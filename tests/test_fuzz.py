"""The fuzz targets of tests/fuzz/, in two ways (issue 3, "fuzz the decoders").

* Without atheris (always runs): each target's ``TestOneInput`` on its seed
  corpus, on the regression corpus ``tests/fuzz/corpus/<target>/`` (one
  file per input: crashers the fuzzers found, and inputs aimed at each
  decoder's bounds checks), and on ~2000 deterministic random inputs per target (random bytes, and seeds mutated: bit flips, truncation,
  insertion, duplication, splicing).  Any assertion or exception fails.
* With atheris: the real coverage-guided fuzzers for a few seconds each via
  ``tests/fuzz/run.py`` (the "run briefly in CI" part).  Skipped, with the
  reason printed, when atheris cannot be imported.

Longer runs: see tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import pytest

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz")
TARGETS = ("wire", "session", "control", "fastpath", "stun")
RANDOM_INPUTS = 2000
ATHERIS_SECONDS = 5


def _load(name: str):
    """tests/fuzz/NAME.py by path, as the runner loads it (shared module cache)."""
    modname = "_mpvpn_fuzz_run" if name == "run" else f"_mpvpn_fuzz_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    path = os.path.join(FUZZ_DIR, f"{name}.py" if name == "run" else f"fuzz_{name}.py")
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        k = rng.randrange(7)
        if k == 0 and b:  # flip a bit
            i = rng.randrange(len(b) * 8)
            b[i >> 3] ^= 1 << (i & 7)
        elif k == 1 and b:  # set a byte (interesting values first)
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif k == 2:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif k == 3 and b:  # truncate
            del b[rng.randrange(len(b)):]
        elif k == 4 and len(b) > 1:  # delete a range
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 16)]
        elif k == 5 and b:  # duplicate a chunk (replay-like)
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randrange(1, 64))
            b[j:j] = b[i:j]
        else:  # splice with another seed
            other = rng.choice(seeds)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
    return bytes(b)


def _inputs(name: str, seeds: list[bytes], n: int):
    rng = random.Random(f"mpvpn-fuzz-{name}")
    for _ in range(n):
        if rng.random() < 0.25:
            yield rng.randbytes(rng.randrange(0, 300))
        else:
            yield _mutate(rng, rng.choice(seeds), seeds)


# The regression corpus: tests/fuzz/corpus/<target>/<what-it-exercises>.  A
# crash a fuzzer finds goes there, minimized (libFuzzer's -minimize_crash=1),
# named after what it broke (see tests/fuzz/README.md).
CORPUS_DIR = os.path.join(FUZZ_DIR, "corpus")


def _corpus(name: str) -> list[str]:
    d = os.path.join(CORPUS_DIR, name)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


REGRESSIONS = [(name, path) for name in TARGETS for path in _corpus(name)]


@pytest.mark.parametrize("name", TARGETS)
def test_target_on_seeds_and_deterministic_random_inputs(name):
    mod = _load(name)
    seeds = mod.seed_corpus()
    assert seeds, "a target needs a seed corpus"
    for s in seeds:
        mod.TestOneInput(s)
    for i, data in enumerate(_inputs(name, seeds, RANDOM_INPUTS)):
        try:
            mod.TestOneInput(data)
        except BaseException as exc:
            raise AssertionError(f"fuzz_{name} failed on deterministic input #{i}: "
                                 f"{data!r}") from exc


@pytest.mark.parametrize("name", TARGETS)
def test_every_target_has_a_regression_corpus(name):
    assert len(_corpus(name)) >= 10, f"tests/fuzz/corpus/{name}/ is (nearly) empty"


@pytest.mark.parametrize("name,path", REGRESSIONS,
                         ids=[f"{n}/{os.path.basename(p)}" for n, p in REGRESSIONS])
def test_fuzz_regressions(name, path):
    """Each corpus input through its target: any exception (the target's own
    assertions included) fails the test."""
    with open(path, "rb") as fh:
        data = fh.read()
    _load(name).TestOneInput(data)


def test_atheris_fuzzers_run_briefly():
    run = _load("run")
    reason = run.atheris_missing()
    if reason:
        sys.stderr.write(f"\nfuzz: atheris fuzzers skipped: {reason}\n")
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, run.__file__, "--seconds", str(ATHERIS_SECONDS),
                           "--jobs", str(len(TARGETS))],
                          check=False, capture_output=True, text=True, timeout=ATHERIS_SECONDS * 6 + 120)
    out = proc.stdout + proc.stderr
    sys.stderr.write("\n" + proc.stdout)
    assert proc.returncode == 0, out[-6000:]
    for name in TARGETS:
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"fuzz {name}:")), None)
        assert line is not None, out[-3000:]
        assert "crashes 0" in line, line
        execs = int(line.split(":")[1].split()[0])
        assert execs > 0, line
