"""clusters/local.yaml (what `clusters/local.sh up` runs here, tested end to end in
tests/integration/test_local_cluster.py) and cluster.yaml (GCP) run the same setup and the same
`ray start`: they may differ only in addresses, ports, resources and folders, and in the
`ray stop` that local.yaml must not run (on one host it stops every Ray)."""

from __future__ import annotations

import shlex
import string
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"${REPO}": "~/ray-train-resume", "$HOME/ray-train-resume": "~/ray-train-resume"}
# addresses, ports, resources and folders
MAY_DIFFER = {"--node-ip-address", "--port", "--object-manager-port", "--dashboard-port",
              "--ray-client-server-port", "--dashboard-agent-listen-port", "--temp-dir",
              "--num-cpus"}
# ports, and how soon a lost node is restarted (one host: no network to ride out)
LOCAL_ONLY_ENV = {"AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT", "AUTOSCALER_HEARTBEAT_TIMEOUT_S"}


def load(name: str) -> dict:
    text = (REPO / name).read_text()
    for local, remote in FOLDERS.items():
        text = text.replace(local, remote)
    return yaml.safe_load(string.Template(text).safe_substitute())


def start_command(commands: list[str]) -> tuple[list[str], dict, dict]:
    """The `ray start` command's other statements, its exports, and its flags."""
    (line,) = [c for c in commands if "ray start" in c]
    others, env, flags = [], {}, {}
    for statement in (s.strip() for s in line.split(";") if s.strip()):
        words = shlex.split(statement)
        if words[0] == "export":
            env.update(w.split("=", 1) for w in words[1:])
        elif "start" in words and words[words.index("start") - 1] == "ray":
            at = words.index("start") - 1
            if at:  # a launcher before it: the spot watcher on worker nodes (its options may differ)
                others.append(" ".join(w for w in words[:at] if w.endswith(("spot_watch.py", "--"))))
            for word in words[at + 2:]:
                key, _, value = word.partition("=")
                flags[key] = value
        else:
            others.append(statement)
    return others, env, flags


def compare(local_cmds: list[str], remote_cmds: list[str]) -> None:
    l_others, l_env, l_flags = start_command(local_cmds)
    r_others, r_env, r_flags = start_command(remote_cmds)
    assert l_others == r_others  # ulimit, unset SSH_CLIENT SSH_CONNECTION
    assert {k: v for k, v in l_env.items() if k not in LOCAL_ONLY_ENV} == r_env
    keep = lambda flags: {k: v.split(":")[0] if k == "--address" else v  # noqa: E731
                          for k, v in flags.items() if k not in MAY_DIFFER}
    assert keep(l_flags) == keep(r_flags)
    assert [c for c in remote_cmds if "ray start" not in c] in (["~/ray-train-resume/.venv/bin/ray stop"],
                                                                ["~/ray-train-resume/.venv/bin/ray stop --force"])
    assert [c for c in local_cmds if "ray start" not in c] == []


def test_setup_and_file_mounts_are_the_same():
    local, remote = load("clusters/local.yaml"), load("cluster.yaml")
    assert local["setup_commands"] == remote["setup_commands"] == ["cd ~/ray-train-resume && ./setup.sh"]
    assert local["rsync_exclude"] == remote["rsync_exclude"]
    assert "~/ray-train-resume" in local["file_mounts"] and "~/ray-train-resume" in remote["file_mounts"]


def test_head_and_worker_start_ray_the_same_way():
    local, remote = load("clusters/local.yaml"), load("cluster.yaml")
    compare(local["head_start_ray_commands"], remote["head_start_ray_commands"])
    compare(local["worker_start_ray_commands"], remote["worker_start_ray_commands"])


def test_the_comparison_catches_a_drift():
    local, remote = load("clusters/local.yaml"), load("cluster.yaml")
    drifted = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
               for c in remote["head_start_ray_commands"]]
    try:
        compare(local["head_start_ray_commands"], drifted)
    except AssertionError:
        return
    raise AssertionError("a changed --dashboard-host went unnoticed")
