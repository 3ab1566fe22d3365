"""cluster.yaml passes Ray's own autoscaler validation and says what the product needs."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())


def test_ray_accepts_the_config():
    validate_config(prepare_config(CONFIG))


def test_cpu_head_and_spot_multi_gpu_workers():
    types = CONFIG["available_node_types"]
    head = types[CONFIG["head_node_type"]]
    assert "GPU" not in head["resources"]
    workers = [t for name, t in types.items() if name != CONFIG["head_node_type"]]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["resources"]["GPU"] >= 2
    assert worker["node_config"]["guestAccelerators"][0]["acceleratorCount"] == worker["resources"]["GPU"]
    assert {"preemptible": True} in worker["node_config"]["scheduling"]
    assert 0 < worker["min_workers"] <= worker["max_workers"] <= CONFIG["max_workers"]


def test_storage_access_by_service_account_not_key_files():
    for node in CONFIG["available_node_types"].values():
        account = node["node_config"]["serviceAccounts"][0]
        assert account["email"].endswith(".iam.gserviceaccount.com")
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
    assert not any("json" in str(src) for src in CONFIG["file_mounts"].values())


def test_setup_installs_requirements_dashboard_local_token_auth():
    assert CONFIG["file_mounts"]["~/ray-train-resume"] == "."
    assert CONFIG["setup_commands"] == ["cd ~/ray-train-resume && ./setup.sh"]
    head = " ".join(CONFIG["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(CONFIG["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in CONFIG["file_mounts"]


def test_worker_nodes_fit_the_production_workers_and_ray_data():
    from configs.presets import production

    scaling = production().scaling
    worker = next(t for name, t in CONFIG["available_node_types"].items() if name != CONFIG["head_node_type"])
    assert worker["resources"]["GPU"] == scaling.num_workers  # one node holds the run
    needed = scaling.num_workers * scaling.cpus_per_worker + scaling.data_cpus
    assert worker["resources"]["CPU"] >= needed, "Ray Data would starve beside the train workers"
