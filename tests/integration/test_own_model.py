"""Your own model (model.factory): a non-GPT module from the test tree trains, stops and resumes
bitwise exactly like the built-in one; a resume with other factory arguments is refused before
Ray starts; a factory that does not import is refused in seconds."""

import torch
from conftest import read_json
from safetensors.torch import load_file

from ray_job import launcher

FACTORY = "tests.integration.user_models.tiny:mlp"
FINAL = "checkpoint-epoch0-step12-files3"


def _args(runs, run_name, *extra):
    return ["--config", "test", "--storage", runs.storage, "--run-name", run_name,
            "--set", f"data.path={runs.data}", "--set", f"model.factory={FACTORY}",
            "--set", "model.kwargs.hidden=40", "--checkpoint-every", 6, *extra]


def test_own_model_resumes_bitwise_exactly(runs, ray_address):
    straight = launcher.run(_args(runs, "own-straight", "--max-steps", 12), ray_address=ray_address)
    assert straight.rc == 0, straight.out[-4000:]
    first = launcher.run(_args(runs, "own-chain", "--max-steps", 6), ray_address=ray_address)
    assert first.rc == 0, first.out[-4000:]
    second = launcher.run(_args(runs, "own-chain", "--resume", "latest", "--max-steps", 12),
                          ray_address=ray_address)
    assert second.rc == 0, second.out[-4000:]
    assert "✅ Resumed from checkpoint: checkpoint-epoch0-step6-files1" in second.out

    a = read_json(runs.ckpt("own-straight", FINAL) / "training_metrics.json")
    b = read_json(runs.ckpt("own-chain", FINAL) / "training_metrics.json")
    assert [s for s, _ in a["loss_history"]] == list(range(1, 13))
    assert a["loss_history"] == b["loss_history"] and a["lr_history"] == b["lr_history"]
    wa = load_file(runs.ckpt("own-straight", FINAL) / "model.safetensors")
    wb = load_file(runs.ckpt("own-chain", FINAL) / "model.safetensors")
    assert set(wa) == {"embed.weight", "net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}
    assert wa["net.0.weight"].shape == (40, 64)  # model.kwargs reached the factory
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = read_json(runs.ckpt("own-chain", FINAL) / "metadata.json")
    assert meta["config"]["model"]["factory"] == FACTORY and meta["config"]["model"]["kwargs"] == {"hidden": 40}

    other = launcher.run(_args(runs, "own-chain", "--resume", "latest", "--max-steps", 18,
                               "--set", "model.kwargs.hidden=41"))  # the last --set wins
    assert other.rc == 2, other.out[-2000:]
    assert other.err.count("\n") == 1 and "trained with another model" in other.err, other.err


def test_own_model_sharded_by_named_class_continues_a_ddp_checkpoint(runs, ray_address):
    """model.shard_modules names the user's block (no nn.ModuleList here); the ddp checkpoint at
    step 6 loads spread over the shards and training goes on close to the ddp run (the
    gradient reduction differs: reduce-scatter, not all-reduce)."""
    source = runs.ckpt("own-chain", "checkpoint-epoch0-step6-files1")
    sharded = ["--set", "train.strategy=fsdp", "--set", "model.shard_modules=[Sequential]"]
    p = launcher.run(_args(runs, "own-fsdp", *sharded, "--resume", source, "--max-steps", 12), ray_address=ray_address)
    assert p.rc == 0, p.out[-4000:]
    assert "🧩 fsdp: 1 blocks and the root sharded over 2 workers" in p.out
    assert "🔀 checkpoint-epoch0-step6-files1 was written under ddp; loading it into fsdp" in p.out
    ddp = read_json(runs.ckpt("own-straight", FINAL) / "training_metrics.json")["loss_history"]
    fsdp = read_json(runs.ckpt("own-fsdp", FINAL) / "training_metrics.json")["loss_history"]
    assert fsdp[:6] == ddp[:6] and len(fsdp) == 12
    assert max(abs(a - b) for (_, a), (_, b) in zip(fsdp[6:], ddp[6:])) < 1e-3, (fsdp, ddp)
    assert read_json(runs.ckpt("own-fsdp", FINAL) / "metadata.json")["shards"].keys() == {"0", "1"}


def test_a_factory_that_does_not_import_is_refused_in_seconds(tmp_path):
    for factory, why in (("no_such_pkg.models:build", "ModuleNotFoundError"),
                         ("tests.integration.user_models.tiny:nope", "AttributeError")):
        p = launcher.run(["--config", "test", "--storage", tmp_path, "--set", f"data.path={tmp_path}/d",
                          "--set", f"model.factory={factory}"], timeout=60)
        assert p.rc == 2 and p.took < 20, p.out[-2000:]
        assert p.err.startswith(f"error: model.factory {factory}: cannot import it ({why}")
        assert p.err.count("\n") == 1 and not any(tmp_path.iterdir())
