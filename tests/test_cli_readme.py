"""The README's examples are the program's: its Python runs, its method names are accepted,
its commands exist, its exit codes are the ones kvctl uses."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_example_runs():
    [code] = blocks("python")
    exec(compile(code, "README.md", "exec"), {})


def test_codec_table_names_methods_the_controller_accepts():
    from kvctl.codecs import available_methods

    # the "## Codecs" section's table only (other tables name settings, not methods)
    codecs = README.split("\n## Codecs\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([a-z0-9-]+)`", codecs, flags=re.M)
    assert names and set(names) <= set(available_methods())


def test_commands_in_the_table_exist():
    import typer

    from kvctl.cli import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    section = README.split("## Commands", 1)[1].split("\n\n", 1)[0]
    for cell in re.findall(r"^\| `kvctl ([^`]+)`", section, flags=re.M):
        for name in cell.split("[")[0].split(" / "):
            words = name.split()
            cmd = root.get_command(ctx, words[0])
            assert cmd is not None, name
            if len(words) > 1 and hasattr(cmd, "get_command") and words[1].isalpha():
                assert cmd.get_command(ctx, words[1]) is not None, name


def test_exit_code_table_matches_the_code():
    from kvctl import errors

    table = README.split("**Exit codes**", 1)[1].split("\n\n", 2)[1]
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert codes == {errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE,
                     errors.EXIT_REJECTED, errors.EXIT_INTERRUPTED, errors.EXIT_BROKEN_PIPE}


def test_readme_yaml_is_a_valid_serve_config(tmp_path):
    from kvctl.server.config import build_settings

    [yaml_text] = blocks("yaml")
    path = tmp_path / "example.yaml"
    path.write_text(yaml_text.replace("file:///var/tmp/kvctl/", f"file://{tmp_path}/disk/"))
    s = build_settings(path, {})
    assert s.chunk_size == 256 and s.max_local_disk_size == 20


def _local_address() -> str:
    """A non-loopback address of this machine (so a worker bound to 0.0.0.0 must find it to
    be reachable as registered); 127.0.0.1 when it has none."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("203.0.113.1", 9))  # a documentation address: nothing is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def test_cluster_commands_run_as_written(tmp_path):
    """The "Running on a cluster" commands, run as written: host names become this
    machine's address and the ports free ones; the worker's config is examples/worker.yaml
    with the same substitutions (and no engine, which its own tests cover)."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from tests.cluster_procs import wait_for
    from tests.conftest import free_port

    if shutil.which("redis-server") is None:
        import pytest

        pytest.skip("redis-server is not installed")
    section = README.split("\n## Running on a cluster\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in block.replace("\\\n", " ")
             .splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    addr = _local_address()
    ports = {p: str(free_port()) for p in ("6380", "9000", "9001", "9100", "9101", "8001")}

    def localize(text: str) -> str:
        text = re.sub(r"\bctl-(redis|a|b)\b", addr, text)
        return re.sub(r"\b(6380|9000|9001|9100|9101|8001)\b", lambda m: ports[m[1]], text)

    root = Path(__file__).resolve().parent.parent
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(localize((root / "examples/worker.yaml").read_text())
                   .replace("/var/tmp/kvctl-node1/", f"{tmp_path}/disk/") + 'model: "none"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCTL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    *servers, check = [localize(ln).replace("examples/worker.yaml", str(cfg)) for ln in lines]
    assert check.startswith("kvctl workers")

    def kvctl_workers(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", check + " " + " ".join(extra)], env=env,
                              capture_output=True, text=True, timeout=60)

    try:
        for ln in servers:
            if ln.startswith("export "):
                name, value = ln.removeprefix("export ").split("=", 1)
                env[name] = subprocess.run(["bash", "-c", f"echo {value}"], env=env, check=True,
                                           capture_output=True, text=True).stdout.strip()
                continue
            log = tmp_path / f"{len(procs)}.log"
            with log.open("w") as f:
                procs.append((ln, subprocess.Popen(["bash", "-c", "exec " + ln], env=env,
                                                   cwd=tmp_path, stdout=f,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True), log))

        def registered() -> dict | None:
            for ln, p, log in procs:
                assert p.poll() is None, f"{ln}: exited {p.returncode}\n{log.read_text()}"
            r = kvctl_workers("--json")
            found = {w["instance_id"]: w for w in json.loads(r.stdout)["workers"]
                     } if r.returncode == 0 else {}
            w = found.get("node1")
            return w if w and w["state"] == "alive" else None

        w = wait_for(registered, 180, "node1 never registered alive")
        assert w["url"] == f"http://{addr}:{ports['8001']}"  # reachable as registered
        r = kvctl_workers()
        assert r.returncode == 0 and "node1" in r.stdout, r.stdout + r.stderr
        # controller B shares A's state: it lists the same worker
        r = subprocess.run(["kvctl", "workers", "--json", "--controller",
                            f"http://{addr}:{ports['9100']}"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert [x["instance_id"] for x in json.loads(r.stdout)["workers"]] == ["node1"], \
            r.stderr
        logs = "".join(log.read_text() for _, _, log in procs)
        assert env["KVCTL_AUTH_TOKEN"] not in logs and env["REDIS_PASSWORD"] not in logs
    finally:
        for _, p, _ in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)


def _lmcache_server_starts(cmd: str, tmp: Path, extra_env: dict[str, str]) -> str:
    """Run ``cmd`` (an `lmcache server` command line) with bash until its HTTP port is
    healthy and the kvctl adapter has said it loaded; returns the server's log."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.cluster_procs import wait_for

    env = {**os.environ, "LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false",
           "DO_NOT_TRACK": "1", **extra_env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    log = tmp / "lmcache.log"
    with log.open("w") as f:
        proc = subprocess.Popen(["bash", "-c", cmd], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{env['HTTP_PORT']}/healthcheck", timeout=2) as r:
                return r.status == 200 and "KvctlFSL2Adapter loaded" in log.read_text()
        except OSError:
            return False

    try:
        wait_for(up, 180, f"lmcache server did not start:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return log.read_text()


def test_lmcache_command_and_example_start_a_server_with_the_adapter(tmp_path):
    """The README's `lmcache server` command as written (ports, folder and L1 size moved
    here) and
    examples/lmcache-server.sh start a real LMCache 0.5.6 server on this CPU machine, whose
    log confirms kvctl's adapter."""
    import shutil
    import sys

    import pytest

    from tests.conftest import free_port

    if not Path(sys.executable).with_name("lmcache").exists() and not shutil.which("lmcache"):
        pytest.skip("the lmcache console script is not installed")
    section = README.split("\n## LMCache: ", 1)[1].split("\n## ", 1)[0]
    cmd = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].strip()
    assert cmd.startswith("lmcache server ")
    ports = {"PORT": str(free_port()), "HTTP_PORT": str(free_port())}
    # a 4 GB L1 is allocated at start: a quarter of one on this shared machine
    assert "--l1-size-gb 4 " in cmd
    readme_cmd = (cmd.replace("/var/cache/lmcache-kv", str(tmp_path / "kv-readme"))
                  .replace("--l1-size-gb 4 ", "--l1-size-gb 0.25 ")
                  + ' --port "$PORT" --http-port "$HTTP_PORT"')
    log = _lmcache_server_starts(readme_cmd, tmp_path, ports)
    assert f"storing blobs at their real size in {tmp_path / 'kv-readme'}" in log

    script = Path(__file__).resolve().parent.parent / "examples" / "lmcache-server.sh"
    ports = {"PORT": str(free_port()), "HTTP_PORT": str(free_port()),
             "KV_DIR": str(tmp_path / "kv-example"), "HEAD_DIM": "64", "L1_SIZE_GB": "0.25"}
    log = _lmcache_server_starts(str(script), tmp_path, ports)
    assert f"storing blobs at their real size in {tmp_path / 'kv-example'}" in log


def test_example_serve_config_is_the_readmes_and_valid(tmp_path):
    from kvctl.server.config import build_settings

    root = Path(__file__).resolve().parent.parent
    shipped = (root / "examples" / "serve.yaml").read_text()
    [yaml_text] = blocks("yaml")
    assert shipped.split("\n", 1)[1] == yaml_text
    path = tmp_path / "serve.yaml"
    path.write_text(shipped.replace("file:///var/tmp/kvctl/", f"file://{tmp_path}/disk/"))
    assert build_settings(path, {}).chunk_size == 256
