#!/usr/bin/env python3
"""Build dist/tcia_downloader.pyz: the tool and its pure-Python dependencies in one file.

    python3 tools/build_pyz.py                  # writes dist/tcia_downloader.pyz (+ .lock)
    python3 tools/build_pyz.py --lock dist/tcia_downloader.pyz.lock   # the same versions again

The .pyz is a shiv zipapp: `python3 tcia_downloader.pyz --collection X` runs on a bare Python
3.9-3.13 with nothing installed and no network but TCIA's. On its first run it extracts its
packages to $SHIV_ROOT (default ~/.shiv, about 15 MB; see docs/install.md) and later runs import
from there: pydicom reads its data files by path, which fails inside a zip.

How it is built, and why:
  * The build tools (shiv, pip, packaging; pinned in BUILD_TOOLS) go into a temporary venv
    from PyPI; nothing is installed for the Python that runs this script.
  * The runtime packages (requirements.txt, capped by tools/pyz-constraints.txt) are
    resolved for the OLDEST supported Python as pure wheels only (pip --python-version 3.9
    --implementation py --abi none --platform any): a release that needs 3.10 (urllib3 2.8)
    is skipped, and a compiled one (charset-normalizer's mypyc wheels) is never taken.
  * pip ignores its config files here (--isolated): a flat find-links folder or a mirror
    without Requires-Python data would hand it releases that do not run on 3.9.
  * pip evaluates `; python_version < "3.11"` markers for the Python running pip, not for
    --python-version, so a dependency that only older Pythons need (exceptiongroup, for
    cattrs) would be left out. The bundle is checked against every Python in 3.9-3.13 and
    what any of them needs is added. A package that does not declare all of them, or that is
    not a py3-none-any wheel, fails the build.
  * Reproducible: shiv --reproducible (fixed timestamps; SOURCE_DATE_EPOCH overrides), file
    modes normalised, no .pyc, no bin/ scripts (their #! names this build's venv). The same
    versions give the same bytes; the .lock beside the .pyz lists them for --lock.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
CONSTRAINTS = Path(__file__).resolve().parent / "pyz-constraints.txt"
DEFAULT_OUTPUT = ROOT / "dist" / "tcia_downloader.pyz"
PYTHONS = [(3, minor) for minor in range(9, 14)]          # what the README claims: 3.9-3.13
BUILD_TOOLS = ["shiv==1.0.8", "pip==25.2", "packaging==25.0"]
ENTRY_POINT = "tcia_downloader:main"   # the top-level script: its one-line message on 3.6-3.8
SHEBANG = "/usr/bin/env python3"
INNER = "TCIA_BUILD_PYZ_STAGE"         # set when this script runs inside its build venv


def say(message: str) -> None:
    print(f"build_pyz: {message}", flush=True)


def run(argv: list, **kwargs) -> None:
    subprocess.run([str(a) for a in argv], check=True, **kwargs)


# -- outside: the build venv ---------------------------------------------------------------

def outer(args: argparse.Namespace, argv: list[str]) -> int:
    if sys.version_info < PYTHONS[0]:
        sys.exit("build_pyz: run it with Python %d.%d or newer" % PYTHONS[0])
    work = Path(tempfile.mkdtemp(prefix="build_pyz-"))
    try:
        venv = work / "venv"
        say(f"build tools ({', '.join(BUILD_TOOLS)}) into a temporary venv")
        try:
            run([sys.executable, "-m", "venv", venv])
        except subprocess.CalledProcessError:
            sys.exit(f"build_pyz: {sys.executable} -m venv failed (on Debian/Ubuntu: "
                     "apt-get install python3-venv)")
        python = venv / "bin" / "python"
        run([python, "-m", "pip", "--isolated", "install", "--quiet",
             "--disable-pip-version-check", *BUILD_TOOLS])
        env = dict(os.environ, **{INNER: str(work)})
        return subprocess.run([str(python), __file__, *argv], env=env).returncode
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# -- inside the build venv: resolve, check, pack ---------------------------------------------

class Dist:
    """One installed distribution in the stage, read from its .dist-info."""

    def __init__(self, info: Path):
        meta = email.parser.Parser().parsestr(
            (info / "METADATA").read_text(encoding="utf-8"), headersonly=True)
        wheel = email.parser.Parser().parsestr((info / "WHEEL").read_text(encoding="utf-8"))
        self.name, self.version = meta["Name"], meta["Version"]
        self.requires_python = meta.get("Requires-Python") or ""
        self.requires = meta.get_all("Requires-Dist") or []
        self.tags = wheel.get_all("Tag") or []


def marker_environment(version: tuple[int, int]) -> dict[str, str]:
    from packaging.markers import default_environment
    env = default_environment()
    env.update(python_version="%d.%d" % version, python_full_version="%d.%d.0" % version,
               implementation_name="cpython", platform_python_implementation="CPython",
               os_name="posix", sys_platform="linux", platform_system="Linux", extra="")
    return env


def check_bundle(stage: Path) -> tuple[list[str], list[str]]:
    """(requirements to add, fatal problems) of the packages in `stage`, for every Python in
    PYTHONS."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    dists = {canonicalize_name(d.name): d for d in map(Dist, sorted(stage.glob("*.dist-info")))}
    missing: dict[str, str] = {}
    problems = []
    for dist in dists.values():
        unsupported = [v for v in PYTHONS
                       if "%d.%d.0" % v not in SpecifierSet(dist.requires_python)]
        if unsupported:
            problems.append(f"{dist.name} {dist.version} needs Python {dist.requires_python}")
        if not dist.tags or not all(t.endswith("-none-any") and t.startswith("py")
                                    for t in dist.tags):
            problems.append(f"{dist.name} {dist.version} is not a pure wheel ({dist.tags})")
        for line in dist.requires:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(marker_environment(v))
                                                  for v in PYTHONS):
                continue
            have = dists.get(canonicalize_name(req.name))
            if have is None:
                missing[canonicalize_name(req.name)] = f"{req.name}{req.specifier}"
            elif not req.specifier.contains(have.version, prereleases=True):
                problems.append(f"{dist.name} needs {req}, the bundle has {have.version}")
    return sorted(missing.values()), problems


def resolve(stage: Path, args: argparse.Namespace) -> None:
    extra: list[str] = []
    for _ in range(5):
        shutil.rmtree(stage, ignore_errors=True)
        say("resolving requirements.txt for Python %d.%d, pure wheels only%s"
            % (PYTHONS[0] + (f", adding {', '.join(extra)}" if extra else "",)))
        run([sys.executable, "-m", "pip", "--isolated", "install", "--quiet",
             "--disable-pip-version-check", "--no-compile", "--target", stage,
             "--only-binary=:all:", "--implementation", "py", "--abi", "none",
             "--platform", "any", "--python-version", "%d.%d" % PYTHONS[0],
             "-r", REQUIREMENTS, "-c", CONSTRAINTS,
             *(["-c", args.lock] if args.lock else []), *args.pip_arg, *extra])
        missing, problems = check_bundle(stage)
        if problems:
            sys.exit("build_pyz: the bundle would not run on Python %d.%d-%d.%d:\n  %s\n"
                     "Cap the offending package in %s, saying why."
                     % (*PYTHONS[0], *PYTHONS[-1], "\n  ".join(problems),
                        CONSTRAINTS.relative_to(ROOT)))
        if not missing:
            return
        extra = sorted(set(extra) | set(missing))
    sys.exit(f"build_pyz: the dependencies did not close: still missing {missing}")


def add_tool(stage: Path) -> None:
    """The package, the top-level entry script, and nothing the build leaves behind."""
    shutil.copytree(ROOT / "src" / "tcia_dl", stage / "tcia_dl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "tcia_downloader.py", stage / "tcia_downloader.py")
    # Console scripts (their #! names this build's venv), and REQUESTED (whether pip added a
    # package itself depends on the Python running the build): gone, and from RECORD too.
    shutil.rmtree(stage / "bin", ignore_errors=True)
    for requested in stage.glob("*.dist-info/REQUESTED"):
        requested.unlink()
    for record in stage.glob("*.dist-info/RECORD"):
        lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
        record.write_text("".join(line for line in lines
                                  if not line.startswith(("../", "bin/"))
                                  and not line.split(",")[0].endswith("/REQUESTED")),
                          encoding="utf-8")
    for cache in list(stage.rglob("__pycache__")):
        shutil.rmtree(cache)
    for path in [stage, *stage.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def inner(args: argparse.Namespace) -> int:
    work = Path(os.environ[INNER])
    stage = work / "site-packages"
    resolve(stage, args)
    add_tool(stage)
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    say(f"packing with shiv into {output}")
    run([sys.executable, "-m", "shiv", "--site-packages", stage, "--entry-point", ENTRY_POINT,
         "--output-file", partial, "--python", SHEBANG, "--reproducible", "--compressed"],
        stdout=subprocess.DEVNULL)
    partial.chmod(0o755)
    os.replace(partial, output)
    versions = sorted(f"{d.name}=={d.version}" for d in map(Dist, stage.glob("*.dist-info")))
    output.with_name(output.name + ".lock").write_text(
        "# the packages in %s, for `tools/build_pyz.py --lock`\n%s\n"
        % (output.name, "\n".join(versions)))
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    say(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    say("bundled: " + " ".join(versions))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="where the .pyz goes (default: dist/tcia_downloader.pyz)")
    parser.add_argument("--lock", help="a .lock of an earlier build: the same versions again")
    parser.add_argument("--pip-arg", action="append", default=[],
                        help="one more argument for pip, which ignores its config files "
                             "here (e.g. --pip-arg=--index-url=URL for a mirror that serves "
                             "Requires-Python); repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the temporary build folder")
    args = parser.parse_args(argv)
    if args.lock:
        args.lock = str(Path(args.lock).resolve())
    return inner(args) if os.environ.get(INNER) else outer(args, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
