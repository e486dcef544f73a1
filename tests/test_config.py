import logging

import pytest

from kvctl.server.config import ConfigError, build_settings
from tests.conftest import DATA


@pytest.mark.parametrize("name", ["seed_example.yaml", "seed_p2p.yaml"])
def test_seed_configs_load_unchanged(name, caplog):
    with caplog.at_level(logging.WARNING):
        s = build_settings(DATA / name)
    assert s.chunk_size == 256 and s.local_cpu and s.max_local_cpu_size == 5
    assert s.lmcache_instance_id == "lmcache_default_instance"
    assert s.cpu_bytes == 5 * 1024**3
    assert not caplog.records


def test_env_config_file_and_overrides(monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(DATA / "seed_p2p.yaml"))
    s = build_settings(None, {"port": 9100, "model": None})
    assert s.p2p_init_ports == 8200 and s.port == 9100 and s.model == "smollm2"


def test_unknown_key_warns(tmp_path, caplog):
    p = tmp_path / "c.yaml"
    p.write_text("chunk_size: 128\nchunk_sise: 64\n")
    with caplog.at_level(logging.WARNING):
        s = build_settings(p)
    assert s.chunk_size == 128
    assert "chunk_sise" in caplog.text


@pytest.mark.parametrize("text,key", [
    ("chunk_size: -4\n", "chunk_size"),
    ("max_local_cpu_size: lots\n", "max_local_cpu_size"),
    ("local_cpu: [1]\n", "local_cpu"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key):
        build_settings(p)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_settings(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_settings(p)


def test_local_disk_accepts_file_urls():
    s = build_settings(None, {"local_disk": "file:///tmp/kvc/"})
    assert str(s.local_disk_path) == "/tmp/kvc"
