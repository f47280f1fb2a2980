"""Run the atheris fuzz targets for a while; non-zero exit on any crash.

    python -m tests.fuzz.run --seconds 60                 # every target, 60 s each
    python -m tests.fuzz.run --seconds 600 --target session --corpus /tmp/corpus
    python tests/fuzz/run.py --seconds 5 --jobs 3         # what tests/test_fuzz.py runs

Each target runs in its own subprocess under libFuzzer (``-max_total_time``,
``-rss_limit_mb``, ``-timeout``), starting from a small seed corpus that the
target builds in code (``seed_corpus()``: valid datagrams, frames and
scripts) plus the regression corpus ``tests/fuzz/corpus/<target>/``.  One summary line per target::

    fuzz wire: 1234567 execs in 5 s (246913/s), crashes 0, corpus 19 -> 31

On a crash the libFuzzer log tail and the crash file are printed; the crash
file is kept (``--artifacts``, default a temporary directory that is not
removed) and reproduces with ``python tests/fuzz/fuzz_NAME.py CRASH_FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGETS = ("wire", "session", "control", "fastpath", "stun")


def target_path(name: str) -> str:
    return os.path.join(HERE, f"fuzz_{name}.py")


def load_target(name: str):
    """Import ``tests/fuzz/fuzz_NAME.py`` by path (no package layout needed)."""
    modname = f"_mpvpn_fuzz_{name}"
    mod = sys.modules.get(modname)
    if mod is None:
        spec = importlib.util.spec_from_file_location(modname, target_path(name))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
    return mod


def atheris_missing() -> str | None:
    """None if atheris can be imported here, else the reason."""
    try:
        import atheris  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native module
        return f"atheris not importable ({type(exc).__name__}: {exc}); pip install atheris"
    return None


def write_seeds(name: str, corpus: str) -> int:
    os.makedirs(corpus, exist_ok=True)
    seeds = load_target(name).seed_corpus()
    regress = os.path.join(HERE, "corpus", name)  # the regression corpus joins the seeds
    if os.path.isdir(regress):
        for f in sorted(os.listdir(regress)):
            with open(os.path.join(regress, f), "rb") as fh:
                seeds.append(fh.read())
    for s in seeds:
        path = os.path.join(corpus, "seed-" + hashlib.sha1(s).hexdigest())
        with open(path, "wb") as fh:
            fh.write(s)
    return len(seeds)


def _env() -> dict:
    env = dict(os.environ)
    src = os.path.join(REPO, "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_target(name: str, seconds: int, *, rss_limit_mb: int = 2048, corpus: str | None = None,
               artifacts: str, timeout_per_input: int = 20, extra=()) -> dict:
    """Fuzz one target in a subprocess; returns a result dict."""
    work = tempfile.mkdtemp(prefix=f"mpvpn-fuzz-{name}-")
    try:
        corpus = corpus or os.path.join(work, "corpus")
        n_seeds = write_seeds(name, corpus)
        n_before = len(os.listdir(corpus))
        art = os.path.join(artifacts, name)
        os.makedirs(art, exist_ok=True)
        log = os.path.join(work, "libfuzzer.log")
        cmd = [sys.executable, target_path(name), corpus,
               f"-max_total_time={seconds}", f"-rss_limit_mb={rss_limit_mb}",
               f"-timeout={timeout_per_input}", "-print_final_stats=1",
               f"-artifact_prefix={art}{os.sep}", *extra]
        t0 = time.monotonic()
        with open(log, "wb") as fh:
            # A hard wall-clock cap in case libFuzzer itself hangs.
            try:
                rc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                    cwd=REPO, timeout=seconds * 3 + 120).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        wall = time.monotonic() - t0
        with open(log, "r", errors="replace") as fh:
            text = fh.read()
        execs = _stat(text, r"stat::number_of_executed_units:\s*(\d+)")
        if execs is None:
            execs = _stat(text, r"Done (\d+) runs in")
        per_sec = _stat(text, r"stat::average_exec_per_sec:\s*(\d+)")
        crashes = sorted(f for f in os.listdir(art)
                         if f.startswith(("crash-", "timeout-", "oom-", "leak-", "slow-unit-")))
        ok = rc == 0 and not [c for c in crashes if not c.startswith("slow-unit-")]
        return {"name": name, "ok": ok, "rc": rc, "execs": execs or 0, "seconds": wall,
                "per_sec": per_sec or int((execs or 0) / max(wall, 1e-9)),
                "crashes": 0 if ok else max(1, len(crashes)), "artifacts": [os.path.join(art, c)
                                                                             for c in crashes],
                "seeds": n_seeds, "corpus": (n_before, len(os.listdir(corpus))),
                "log_tail": "" if ok else "\n".join(text.splitlines()[-60:])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stat(text: str, rx: str) -> int | None:
    m = re.findall(rx, text)
    return int(m[-1]) if m else None


def summary(r: dict) -> str:
    return (f"fuzz {r['name']}: {r['execs']} execs in {r['seconds']:.0f} s ({r['per_sec']}/s), "
            f"crashes {r['crashes']}, corpus {r['corpus'][0]} -> {r['corpus'][1]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="fuzzing time per target (default 10)")
    ap.add_argument("--target", action="append", choices=TARGETS,
                    help="target to run (repeatable; default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--corpus", help="keep and grow the corpus here (a subdirectory per target)")
    ap.add_argument("--artifacts", help="where crash files go (default: a kept temporary dir)")
    ap.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags, after --")
    args = ap.parse_args(argv)
    reason = atheris_missing()
    if reason:
        print(f"fuzz: skipped: {reason}", file=sys.stderr)
        return 2
    names = args.target or list(TARGETS)
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="mpvpn-fuzz-artifacts-")

    def one(name):
        corpus = os.path.join(args.corpus, name) if args.corpus else None
        return run_target(name, args.seconds, rss_limit_mb=args.rss_limit_mb, corpus=corpus,
                          artifacts=artifacts, extra=args.libfuzzer_args)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    failed = [r for r in results if not r["ok"]]
    for r in results:
        print(summary(r), flush=True)
    for r in failed:
        print(f"\n--- fuzz {r['name']} FAILED (exit {r['rc']}) ---\n{r['log_tail']}")
        for a in r["artifacts"]:
            print(f"crash file: {a}\n  reproduce: {sys.executable} {target_path(r['name'])} {a}")
    if not failed and not args.artifacts:
        shutil.rmtree(artifacts, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
