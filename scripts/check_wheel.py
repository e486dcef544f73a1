"""Build the wheel and run it from a clean virtual environment, as `pip install kvctl` would.

What it proves: the wheel alone (no editable finder, no source tree on sys.path) holds every
module and data file the CLI, `kvctl serve` and `kvctl worker` need.

How it stays fast: the new venv gets the wheel with ``--no-deps``, and its third-party
dependencies (torch, transformers: gigabytes) through a ``.pth`` line naming the project
venv's site-packages. A path line in a ``.pth`` file only appends that directory to sys.path;
the ``.pth`` files inside it (among them the editable install's finder) are not run, and the
new venv's own site-packages comes first, so ``kvctl`` can only come from the wheel. The
script asserts both, and that every requirement in the wheel's metadata is met by what is
importable, so a dependency the wheel forgot to declare still fails here only if it is
missing from the project venv too (the price of not downloading torch again).

Usage: ``python scripts/check_wheel.py [--keep DIR]`` (run by .ci/run; ~30-60 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# what setup.py maps into the one `kvctl` package (folder -> import name)
FOLDERS = {"kvctl": "kvctl", "codecs": "kvctl.codecs", "server": "kvctl.server"}
SOURCES = ["setup.py", "pyproject.toml", "README.md"]
DEADLINE_S = 120.0
STOP_S = 90.0


class CheckFailed(Exception):
    pass


def copy_source(dest: Path, root: Path = ROOT) -> Path:
    """What a build reads, without caches, build/ or egg-info (nothing stale can leak in)."""
    for folder in FOLDERS:
        shutil.copytree(root / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in SOURCES:
        shutil.copy2(root / name, dest / name)
    return dest


def build_wheel(out: Path, src: Path | None = None) -> Path:
    """The wheel of ``src`` (default: a clean copy of this checkout), built into out/dist."""
    src = src or copy_source(out / "src")
    dist = out / "dist"
    # no build isolation: setuptools comes from the running venv, not from an index
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(src)], check=True)
    wheels = list(dist.glob("kvctl-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one kvctl wheel in {dist}, found {wheels}")
    return wheels[0]


def expected_contents(root: Path = ROOT) -> tuple[set[str], set[str]]:
    """(packages, data files) the source tree holds, as the wheel must name them: every
    folder under kvctl/, codecs/, server/ with a .py or data file is a package."""
    packages: set[str] = set()
    files: set[str] = set()
    for folder, name in FOLDERS.items():
        base = root / folder
        for path in base.rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.parent.relative_to(base).parts
            pkg = ".".join((name, *rel))
            packages.add(pkg)
            files.add("/".join((*pkg.split("."), path.name)))
    return packages, files


def wheel_contents(wheel: Path) -> tuple[set[str], set[str]]:
    """(packages, files) of a wheel: a package is a folder holding a file."""
    with zipfile.ZipFile(wheel) as zf:
        files = {n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    packages = {".".join(f.split("/")[:-1]) for f in files if "/" in f}
    return packages, files


def wheel_modules(wheel: Path) -> list[str]:
    _, files = wheel_contents(wheel)
    mods = []
    for f in sorted(files):
        if not f.endswith(".py"):
            continue
        parts = f[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def make_venv(where: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (no deps) and the project venv's packages behind
    it; returns its bin/ folder."""
    # the interpreter the project venv was made from, not the venv itself
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_kvctl_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return where / "bin"


PROBE = r"""
import importlib, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
import kvctl
out = {"kvctl_file": kvctl.__file__,
       "finders": [type(f).__name__ for f in sys.meta_path if "editable" in repr(f).lower()],
       "unmet": [], "failed": []}
for line in md.requires("kvctl") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        out["unmet"].append(f"{req} (not installed)")
        continue
    if have not in req.specifier:
        out["unmet"].append(f"{req} (have {have})")
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        out["failed"].append(f"{name}: {type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def check_imports(bindir: Path, wheel: Path, venv: Path) -> int:
    import json

    mods = wheel_modules(wheel)
    r = subprocess.run([str(bindir / "python"), "-c", PROBE, *mods], capture_output=True,
                       text=True, cwd=venv, timeout=300)
    if r.returncode != 0:
        raise CheckFailed(f"import probe failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["kvctl_file"].startswith(str(venv)):
        raise CheckFailed(f"kvctl imported from {out['kvctl_file']}, not from the new venv")
    if out["finders"]:
        raise CheckFailed(f"an editable finder is active: {out['finders']}")
    if out["unmet"]:
        raise CheckFailed("requirements not met: " + "; ".join(out["unmet"]))
    if out["failed"]:
        raise CheckFailed("modules that do not import:\n  " + "\n  ".join(out["failed"]))
    return len(mods)


def _poll(cond: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path,
          deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise CheckFailed(f"{what}: the process exited ({proc.returncode}):\n"
                              f"{log.read_text()[-3000:]}")
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise CheckFailed(f"{what}: not ready in {deadline_s:.0f} s:\n{log.read_text()[-3000:]}")


def _urls(log: Path) -> dict[str, str]:
    """The `kvctl NAME http://host:port` lines a server prints once it listens."""
    return dict(re.findall(r"^kvctl (\w+)\s+(http://\S+)$", log.read_text(), re.M))


def _start(bindir: Path, args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVCTL_", "LMCACHE_"))}
    env.update(PYTHONUNBUFFERED="1", KVCTL_DEVICE="cpu", HOME=str(cwd),
               XDG_CONFIG_HOME=str(cwd / ".config"))
    with log.open("w") as f:
        # a session of its own: whatever it starts (codec pool, forkserver) can be killed
        # with it if it does not stop
        return subprocess.Popen([str(bindir / "kvctl"), *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen, what: str, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            # a worker that has just started waits for its codec warm-up (a JIT compile,
            # tens of seconds on a busy 2-core machine) before it exits
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait(10)
            raise CheckFailed(f"{what} did not stop on SIGINT:\n"
                              f"{log.read_text()[-2000:]}") from None
    _kill_group(proc)  # anything it left behind
    if proc.returncode not in (0, 130, -signal.SIGINT):
        raise CheckFailed(f"{what} exited {proc.returncode} on SIGINT:\n"
                          f"{log.read_text()[-2000:]}")


def run_servers(bindir: Path, work: Path) -> None:
    serve_log, worker_log = work / "serve.log", work / "worker.log"
    serve = _start(bindir, ["serve", "--model", "none", "--port", "0", "--monitor-port", "0",
                            "--coordinator-port", "0"], serve_log, work)
    worker = None
    try:
        _poll(lambda: {"controller", "monitor", "coordinator"} <= _urls(serve_log).keys(),
              "kvctl serve", serve, serve_log)
        urls = _urls(serve_log)
        for part in ("monitor", "coordinator"):
            _poll(lambda part=part: httpx.get(urls[part] + "/healthz", timeout=2
                                              ).status_code == 200,
                  f"kvctl serve: the {part}'s /healthz", serve, serve_log)
        mon = urls["monitor"].removeprefix("http://")
        worker = _start(bindir, ["worker", "--model", "none", "--controller", mon,
                                 "--instance-id", "wheel-check"], worker_log, work)
        _poll(lambda: "worker" in _urls(worker_log), "kvctl worker", worker, worker_log)
        wurl = _urls(worker_log)["worker"]
        _poll(lambda: httpx.get(wurl + "/healthz", timeout=2).status_code == 200,
              "kvctl worker /healthz", worker, worker_log)
        _poll(lambda: any(w["instance_id"] == "wheel-check" and w["state"] == "alive"
                          for w in httpx.get(urls["controller"] + "/workers",
                                             timeout=2).json()["workers"]),
              "kvctl worker registered with the controller", worker, worker_log)
        text = httpx.get(wurl + "/metrics", timeout=5).text
        for name in ("kvctl_tier_hits_total", "kvctl_store_bytes",
                     "kvctl_codec_duration_seconds"):
            if name not in text:
                raise CheckFailed(f"the worker's /metrics has no {name}")
    finally:
        try:
            if worker is not None:
                _stop(worker, "kvctl worker", worker_log)
        finally:  # a worker that would not stop must not leave the controller running
            _stop(serve, "kvctl serve", serve_log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this folder and leave it (for a look)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kvctl-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        wheel = build_wheel(work)
        want_pkgs, want_files = expected_contents()
        got_pkgs, got_files = wheel_contents(wheel)
        if missing := sorted(want_pkgs - got_pkgs) + sorted(want_files - got_files):
            raise CheckFailed("missing from the wheel: " + ", ".join(missing))
        print(f"wheel: {wheel.name}, {len(got_pkgs)} packages, {len(got_files)} files "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
        bindir = make_venv(work / "venv", wheel)
        r = subprocess.run([str(bindir / "kvctl"), "--help"], capture_output=True, text=True,
                           cwd=work, timeout=120)
        if r.returncode != 0 or "serve" not in r.stdout:
            raise CheckFailed(f"kvctl --help exited {r.returncode}:\n{r.stdout}{r.stderr}")
        n = check_imports(bindir, wheel, work / "venv")
        print(f"clean venv: kvctl --help ok, {n} modules import "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
        # The codecs' JIT cache lives in the installed package: compile it once here, as a
        # worker's start-up warm-up would. A worker stopped while that compile runs waits
        # for it (minutes on a busy machine), which is not what this check is about.
        subprocess.run([str(bindir / "python"), "-c", "from kvctl.server.worker.jobs import "
                        "warm_up_codecs; warm_up_codecs()"], check=True, cwd=work, timeout=600)
        print(f"clean venv: codecs compiled ({time.monotonic() - t0:.0f} s)", flush=True)
        run_servers(bindir, work)
        print(f"clean venv: kvctl serve (with a coordinator) and kvctl worker (--model none) "
              f"ready, worker registered, /metrics served ({time.monotonic() - t0:.0f} s)",
              flush=True)
    except (CheckFailed, subprocess.CalledProcessError) as exc:
        print(f"check_wheel: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("check_wheel: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
