"""Configuration: defaults, TOML, KERNOS_* environment overrides, and errors that name the field."""
from __future__ import annotations

import pytest

from kernos.kernel.config import EMBEDDED_MODEL, ConfigError, load_config


def test_defaults_serve_the_embedded_model():
    cfg = load_config(env={})
    assert cfg.server.listen == "127.0.0.1:7070"
    assert [m.name for m in cfg.effective_models()] == [EMBEDDED_MODEL]
    assert cfg.default_model_name() == EMBEDDED_MODEL


def test_toml_and_env_overrides(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('data_dir = "/srv/k"\n[engine]\nmax_batch_size = 4\n[[models]]\nname = "a"\npath = "/m/a"\n'
                 '[[models]]\nname = "b"\npath = "/m/b"\n')
    cfg = load_config(f, env={"KERNOS_ENGINE__MAX_BATCH_SIZE": "12", "KERNOS_SERVER__LISTEN": "0.0.0.0:9",
                              "KERNOS_DEFAULT_MODEL": "b", "KERNOS_TOKEN": "ignored", "KERNOS_LOG_LEVEL": "DEBUG",
                              "KERNOS_CACHE_DIR": "/tmp/k"})    # (the CLI's and the kernel cache's, not config)
    assert cfg.engine.max_batch_size == 12 and cfg.server.listen == "0.0.0.0:9"
    assert str(cfg.data_dir) == "/srv/k" and cfg.default_model_name() == "b"


@pytest.mark.parametrize("text,field", [
    ("[engine]\nmax_batch_size = -1\n", "engine.max_batch_size"),
    ("[server]\nlisten = 5\n", "server.listen"),
    ("[limits]\ndefault_temperature = -0.5\n", "limits.default_temperature"),
    ("[engine]\nturbo = true\n", "engine.turbo"),
    ('default_model = "nope"\n[[models]]\nname = "a"\npath = "/x"\n', "default_model"),
    ('[[models]]\nname = "a b"\npath = "/x"\n', "models.0.name"),
])
def test_bad_config_names_the_field(tmp_path, text, field):
    f = tmp_path / "k.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert field in str(err.value)


def test_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_the_sample_config_in_deploy_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "deploy" / "kernos.toml", env={})
    assert cfg.scheduler.policy == "fair_share" and cfg.engine.preemption == "auto"


def test_the_cluster_compose_file_configures_three_nodes_of_one_cluster():
    """deploy/compose.yaml's environment is read by the kernel's own config loader: three nodes, distinct names and
    addresses, one database, bucket and Chroma server."""
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "compose.yaml").read_text())
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("node")}
    assert len(nodes) == 3
    configs = [load_config(env={k: str(v) for k, v in s["environment"].items()}) for s in nodes.values()]
    assert len({c.cluster.node_id for c in configs}) == 3 and len({c.cluster.advertise for c in configs}) == 3
    for c in configs:
        assert c.cluster.database.startswith("postgresql://") and c.cluster.database.endswith("@postgres:5432/kernos")
        assert (c.cluster.objects, c.cluster.s3_endpoint, c.memory.chroma_url) == \
            ("s3://kernos/prod", "http://s3:8333", "http://chroma:8000")
        assert c.server.admin_token
    assert {"postgres", "s3", "chroma"} <= set(compose["services"])
