"""Random damage to a real archive (issue #18): single-bit flips (half of them within 64
bytes of a stream boundary, where the headers, indexes and footers are) and truncations.
Whatever the damage: --verify exits 1 (0 only for the original bytes), no exception escapes
main(), no traceback is printed, and --extract (every 5th case) exits 1, writes nothing
outside --output and leaves no .tcia-extract scratch file. All cases run in one child
process under one timeout; the seed is in every failure message."""
from __future__ import annotations

import json
import subprocess
import sys

from tcia_dl import errors
from tcia_dl.formats import xz as xzread
from helpers import ROOT, Run

SEED = 18_2026
CASES = 150

FUZZ = r"""
import contextlib, io, json, os, random, shutil, sys, traceback
sys.path.insert(0, sys.argv[1])
import tcia_downloader as td
archive, journal, work = sys.argv[2], sys.argv[3], sys.argv[4]
seed, cases, spans = int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
original = open(archive, "rb").read()
pick = random.Random(seed)
boundaries = sorted({at for span in spans for at in span})
cache = os.path.join(work, "cache")
case_dir = os.path.join(work, "case")
os.makedirs(case_dir)
copy = os.path.join(case_dir, "DEMO.tar.xz")                  # a finished archive's name
shutil.copy(journal, copy + ".journal")
expected_beside = {"DEMO.tar.xz", "DEMO.tar.xz.journal", "DEMO.damaged.tcia"}


def run(argv):
    out, err, escaped = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = td.main(argv)
        except BaseException:
            code, escaped = None, traceback.format_exc()[-1500:]
    text = out.getvalue() + err.getvalue()
    return {"code": code, "escaped": escaped, "traceback": "Traceback" in text,
            "last": (out.getvalue().splitlines() or err.getvalue().splitlines() or [""])[-1][-200:]}


for case in range(cases):
    if pick.random() < 0.25:
        length = pick.randrange(1, len(original))
        data, what = original[:length], f"truncated to {length} of {len(original)} bytes"
    else:
        if pick.random() < 0.5:
            offset = pick.choice(boundaries) + pick.randrange(-64, 64)
            offset = min(max(offset, 0), len(original) - 1)
        else:
            offset = pick.randrange(len(original))
        bit = pick.randrange(8)
        data = bytearray(original)
        data[offset] ^= 1 << bit
        data, what = bytes(data), f"bit {bit} of byte {offset} flipped"
    print(json.dumps({"started": case, "what": what}), flush=True)
    with open(copy, "wb") as handle:
        handle.write(data)
    result = {"case": case, "what": what, "identical": data == original,
              "verify": run(["--verify", copy, "--cache_dir", cache])}
    if case % 5 == 0:
        box = os.path.join(work, f"x{case}")
        output = os.path.join(box, "out")
        os.makedirs(box)
        result["extract"] = run(["--extract", copy, "--output", output, "--cache_dir", cache])
        result["debris"] = sorted(os.path.join(folder, name)
                                  for folder, dirs, files in os.walk(output)
                                  for name in files + dirs if name.endswith(".tcia-extract"))
        result["outside"] = sorted(set(os.listdir(box)) - {"out"})
    result["outside"] = result.get("outside", []) + sorted(
        set(os.listdir(case_dir)) - expected_beside) + sorted(
        name for name in os.listdir(work) if name not in ("case", "cache")
        and not name.startswith("x"))
    print(json.dumps(result), flush=True)
"""


def test_random_flips_and_truncations_are_always_reported_never_a_crash(tmp_path,
                                                                      fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=3)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    spans = xzread.xz_stream_spans(archive)
    work = tmp_path / "fuzz"
    work.mkdir()
    argv = [sys.executable, "-c", FUZZ, str(ROOT), str(archive), str(archive) + ".journal",
            str(work), str(SEED), str(CASES), json.dumps(spans)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        started = [line for line in out.splitlines() if '"started"' in line]
        raise AssertionError(f"seed {SEED}: still running after 120 s; the last case "
                             f"started: {started[-1] if started else None}") from None
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    results = [line for line in lines if "case" in line]
    assert len(results) == CASES and "Traceback" not in done.stderr, \
        f"seed {SEED}: {len(results)} of {CASES} cases reported; stderr: {done.stderr[-3000:]}"

    def wrong(result: dict) -> list[str]:
        why = []
        want = errors.EXIT_OK if result["identical"] else errors.EXIT_INCOMPLETE
        for command in ("verify", "extract"):
            run = result.get(command)
            if run is None:
                continue
            if run["code"] != want:
                why.append(f"--{command} exit {run['code']} ({run['last']!r})")
            if run["escaped"] or run["traceback"]:
                raised = run["escaped"] or "a traceback printed"
                why.append(f"--{command} raised: {raised[-600:]}")
        if result["outside"]:
            why.append(f"written outside --output: {result['outside']}")
        if result.get("debris"):
            why.append(f"scratch left: {result['debris']}")
        return why
    bad = [(result, wrong(result)) for result in results if wrong(result)]
    assert not bad, f"seed {SEED}: {len(bad)} of {CASES} mutations handled wrong:\n" + \
        "\n".join(f"case {r['case']} ({r['what']}): {'; '.join(why)}" for r, why in bad[:12])
