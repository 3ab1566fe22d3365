"""configs.schema / configs.presets / ray_job.cli: presets, overrides, validation, flags."""

import dataclasses

import pytest

from configs import PRESETS, load
from configs.loading import from_dict, parse_set, to_dict, with_overrides
from configs.schema import Config, ConfigError, ModelSection, TrainSection
from ray_job.cli import parser, resolve_config


def cli(*argv):
    return resolve_config(parser().parse_args(list(argv)))


# --- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_survive_a_dict_round_trip(name):
    cfg = load(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    assert cfg.run_name == name
    assert from_dict(Config, to_dict(cfg)) == cfg
    assert with_overrides(cfg, {}) == cfg
    assert cfg.train.global_batch_size % (cfg.scaling.num_workers * cfg.train.grad_accum_steps) == 0


def test_test_preset_values():
    cfg = load("test")
    assert (cfg.scaling.num_workers, cfg.train.global_batch_size, cfg.train.max_steps,
            cfg.checkpoint.every) == (2, 16, 40, 8)
    prod = load("production")
    assert prod.scaling.use_gpu is True and prod.checkpoint.storage.startswith("gs://")


def test_production_is_sharded_because_it_would_not_fit_replicated():
    """fp32 weights + gradients + AdamW (2 moments) = 16 bytes a parameter: above one A100 40 GB
    of cluster.yaml's nodes replicated, well under it sharded over the node's 8 GPUs."""
    prod = load("production")
    m = prod.model
    params = 2 * m.vocab_size * m.d_model + m.seq_len * m.d_model + m.n_layer * (12 * m.d_model**2 + 13 * m.d_model)
    assert 2.8e9 < params < 3.3e9
    replicated, sharded = 16 * params, 16 * params / prod.scaling.num_workers
    assert replicated > 40e9 > 4 * sharded
    assert prod.train.strategy == "fsdp" and prod.train.mixed_precision == "bf16"
    assert load("test").train.strategy == "ddp"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown config"):
        load("nope")


# --- parse_set + with_overrides ----------------------------------------------------------------

def test_parse_set_builds_nested_dict_of_yaml_scalars():
    got = parse_set(["train.max_steps=10", "model.dropout=0", "optim.lr=0.5", "scaling.use_gpu=true",
                     "checkpoint.run_name=abc", "checkpoint.storage=", "name=x=y"])
    assert got == {"train": {"max_steps": 10}, "model": {"dropout": 0}, "optim": {"lr": 0.5},
                   "scaling": {"use_gpu": True}, "checkpoint": {"run_name": "abc", "storage": ""},
                   "name": "x=y"}
    assert parse_set([]) == {}
    assert parse_set(["train.max_steps=1", "train.max_steps=2"]) == {"train": {"max_steps": 2}}


@pytest.mark.parametrize("item", ["train.max_steps", "=5", ""])
def test_parse_set_rejects_non_assignments(item):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set([item])


def test_overrides_apply_and_coerce():
    base = load("test")
    cfg = with_overrides(base, parse_set(["train.max_steps=7", "model.dropout=0", "optim.lr=0.25",
                                          "scaling.use_gpu=true", "checkpoint.upload=sync"]))
    assert cfg.train.max_steps == 7
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.optim.lr == 0.25
    assert cfg.scaling.use_gpu is True
    assert cfg.checkpoint.upload == "sync"
    # everything else untouched, and the original is unchanged (frozen)
    assert cfg.model.d_model == base.model.d_model and cfg.data == base.data
    assert base.train.max_steps == 40
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.train.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("assignment,key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),
    ("scaling.use_gpu=1", "scaling.use_gpu"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("checkpoint.storage=5", "checkpoint.storage"),
    ("model=3", "model"),
])
def test_overrides_type_check_and_name_the_key(assignment, key):
    with pytest.raises(ConfigError) as err:
        with_overrides(load("test"), parse_set([assignment]))
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("assignment,full", [
    ("train.max_step=3", "train.max_step"),
    ("model.d_modle=64", "model.d_modle"),
    ("optimizer.lr=1", "optimizer"),
    ("checkpoint.every.x=1", "checkpoint.every"),  # not a section: a type error on the key
])
def test_unknown_key_names_the_full_dotted_key(assignment, full):
    with pytest.raises(ConfigError) as err:
        with_overrides(load("test"), parse_set([assignment]))
    assert full in str(err.value)


def test_unknown_key_message_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        with_overrides(load("test"), {"train": {"max_step": 3}})
    msg = str(err.value)
    assert "'train.max_step'" in msg
    assert "max_steps" in msg and "global_batch_size" in msg


@pytest.mark.parametrize("overrides,key", [
    ({"model": {"d_model": 65}}, "model.d_model"),
    ({"model": {"n_head": 3}}, "model.d_model"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"model": {"n_layer": 0}}, "model.n_layer"),
    ({"train": {"global_batch_size": 15}}, "train.global_batch_size"),
    ({"scaling": {"num_workers": 3}}, "train.global_batch_size"),
    ({"train": {"grad_accum_steps": 3}}, "train.global_batch_size"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({"optim": {"decay_steps": 4}}, "optim.decay_steps"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"data": {"prepare": "auto"}}, "data.prepare"),
    ({"data": {"row_group_size": 0}}, "data.row_group_size"),
    ({"checkpoint": {"every": 0}}, "checkpoint.every"),
    ({"checkpoint": {"upload": "later"}}, "checkpoint.upload"),
    ({"checkpoint": {"run_name": "a/b"}}, "checkpoint.run_name"),
    ({"checkpoint": {"max_failures": -2}}, "checkpoint.max_failures"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
])
def test_bad_values_name_the_field(overrides, key):
    with pytest.raises(ConfigError) as err:
        with_overrides(load("test"), overrides)
    assert str(err.value).startswith(key + ":")


def test_valid_combined_change_passes_validation():
    cfg = with_overrides(load("test"), {"scaling": {"num_workers": 3}, "train": {"global_batch_size": 24}})
    assert (cfg.scaling.num_workers, cfg.train.global_batch_size) == (3, 24)
    cfg = with_overrides(load("test"), {"model": {"n_head": 4, "d_model": 128}})
    assert cfg.model.d_model // cfg.model.n_head == 32


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="^model.d_model:"):
        ModelSection(d_model=10, n_head=3)
    with pytest.raises(ConfigError, match="^train.global_batch_size:"):
        Config(train=TrainSection(global_batch_size=5))


# --- ray_job.cli ---------------------------------------------------------------------------------

def test_cli_defaults_are_the_preset():
    assert cli() == load("test")
    assert cli("--config", "production") == load("production")


def test_cli_flags_map_to_config_keys(tmp_path):
    cfg = cli("--max-steps", "12", "--storage", str(tmp_path), "--run-name", "exp1",
              "--num-workers", "4", "--checkpoint-every", "3")
    assert cfg.train.max_steps == 12
    assert cfg.checkpoint.storage == str(tmp_path)
    assert cfg.checkpoint.run_name == "exp1" and cfg.run_name == "exp1"
    assert cfg.scaling.num_workers == 4
    assert cfg.checkpoint.every == 3
    base = load("test")
    assert cfg.model == base.model and cfg.optim == base.optim and cfg.data == base.data


def test_cli_set_beats_flags():
    cfg = cli("--max-steps", "10", "--set", "train.max_steps=20", "--set", "model.dropout=0")
    assert cfg.train.max_steps == 20
    assert cfg.model.dropout == 0.0


@pytest.mark.parametrize("argv,prefix", [
    (["--max-steps", "0"], "--max-steps (train.max_steps):"),
    (["--checkpoint-every", "0"], "--checkpoint-every (checkpoint.every):"),
    (["--num-workers", "0"], "--num-workers (scaling.num_workers):"),
    (["--run-name", "a/b"], "--run-name (checkpoint.run_name):"),
    (["--num-workers", "3"], "train.global_batch_size:"),
    (["--set", "train.max_step=3"], "Unknown config key 'train.max_step'"),
])
def test_cli_errors_name_the_flag_or_key(argv, prefix):
    with pytest.raises(ConfigError) as err:
        cli(*argv)
    assert str(err.value).startswith(prefix)


def test_cli_rejects_a_non_integer_flag(capsys):
    with pytest.raises(SystemExit) as err:
        parser().parse_args(["--max-steps", "ten"])
    assert err.value.code == 2
    assert "--max-steps" in capsys.readouterr().err


def test_cli_other_args_are_parsed():
    args = parser().parse_args(["--resume", "latest", "--audit-dir", "/tmp/a"])
    assert args.resume == "latest" and args.audit_dir == "/tmp/a" and args.set == []


def test_cli_set_accepts_the_documented_float_example():
    assert cli("--set", "optim.lr=1e-3").optim.lr == pytest.approx(1e-3)


def test_cli_flags_and_set_are_validated_together():
    cfg = cli("--num-workers", "3", "--set", "train.global_batch_size=24")
    assert (cfg.scaling.num_workers, cfg.train.global_batch_size) == (3, 24)


# --- YAML config files --------------------------------------------------------------------------

def test_yaml_with_base_test(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("base: test\ntrain:\n  max_steps: 5\nmodel:\n  dropout: 0.0\n")
    cfg = load(str(path))
    assert cfg.name == "small" and cfg.run_name == "small"
    assert cfg.train.max_steps == 5 and cfg.model.dropout == 0.0
    assert cfg.train.global_batch_size == load("test").train.global_batch_size
    # flags still beat the file, --set beats flags
    cfg = cli("--config", str(path), "--max-steps", "9", "--set", "model.dropout=0.2")
    assert cfg.train.max_steps == 9 and cfg.model.dropout == 0.2 and cfg.name == "small"


def test_yaml_without_base_defaults_to_test_and_can_set_name(tmp_path):
    path = tmp_path / "other.yml"
    path.write_text("name: custom\nscaling:\n  num_workers: 4\n")
    cfg = load(str(path))
    assert cfg.name == "custom" and cfg.scaling.num_workers == 4
    assert cfg.model == load("test").model


def test_yaml_with_base_production(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("base: production\ntrain:\n  max_steps: 3\n")
    cfg = load(str(path))
    assert cfg.train.max_steps == 3 and cfg.model == load("production").model


def test_empty_yaml_is_the_test_preset_renamed(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load(str(path)) == dataclasses.replace(load("test"), name="empty")


@pytest.mark.parametrize("text,needle", [
    ("base: test\ntrain:\n  max_stepz: 5\n", "train.max_stepz"),
    ("base: test\nmodle:\n  d_model: 8\n", "modle"),
    ("base: nope\n", "unknown base 'nope'"),
    ("- a\n- b\n", "expected a mapping"),
    ("base: test\ntrain: 5\n", "train"),
    ("base: test\nmodel:\n  d_model: 63\n", "model.d_model"),
])
def test_bad_yaml_files_fail_naming_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert needle in str(err.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "missing.yaml"))


# --- hardening (issue 10): names that escape, ranges, YAML that breaks ---------------------------

UNSAFE_NAMES = ["..", ".", "../escaped", "a/b", "a\\b", ".hidden", "a\nb", "tab\there", "nul\x00",
                "x" * 201]


@pytest.mark.parametrize("bad", UNSAFE_NAMES)
def test_run_name_must_be_one_safe_folder_name(bad):
    with pytest.raises(ConfigError) as err:
        cli("--run-name", bad)
    assert str(err.value).startswith("--run-name (checkpoint.run_name):")
    assert "\n" not in str(err.value)  # one line on stderr, even for a name holding a newline


@pytest.mark.parametrize("bad", UNSAFE_NAMES + [""])
def test_config_name_must_be_one_safe_folder_name(bad):
    with pytest.raises(ConfigError) as err:
        cli("--set", f"name={bad}")
    assert str(err.value).startswith("name:")
    assert "\n" not in str(err.value)


def test_empty_run_name_flag_is_refused_not_silently_the_default():
    with pytest.raises(ConfigError, match="^--run-name"):
        cli("--run-name", "")


@pytest.mark.parametrize("good", ["exp-1", "run_2.b", "a..b", "Ünïcode", "x" * 200])
def test_ordinary_names_pass(good):
    assert cli("--run-name", good).run_name == good
    assert cli("--set", f"name={good}").run_name == good


def test_yaml_name_and_file_derived_name_are_checked(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: ../escaped\n")
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert "name:" in str(err.value) and str(path) in str(err.value)
    hidden = tmp_path / ".hidden.yaml"
    hidden.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="must not start with '.'"):
        load(str(hidden))


@pytest.mark.parametrize("assignment,key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"),
    ("optim.lr=0", "optim.lr"), ("optim.weight_decay=-5", "optim.weight_decay"),
    ("optim.weight_decay=inf", "optim.weight_decay"), ("optim.min_lr_ratio=5", "optim.min_lr_ratio"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"), ("optim.min_lr_ratio=nan", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.grad_clip=nan", "optim.grad_clip"),
    ("train.val_batch_size=0", "train.val_batch_size"), ("data.shuffle_seed=-1", "data.shuffle_seed"),
    ("train.seed=-1", "train.seed"), ("checkpoint.keep_best=2", "checkpoint.keep_best"),
    ("checkpoint.preemption_wait_s=-1", "checkpoint.preemption_wait_s"),
    ("scaling.cpus_per_worker=inf", "scaling.cpus_per_worker"),
])
def test_out_of_range_values_are_refused_naming_the_key(assignment, key):
    with pytest.raises(ConfigError) as err:
        cli("--set", assignment)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_edge_values_that_are_fine():
    cfg = cli("--set", "optim.min_lr_ratio=0", "--set", "optim.grad_clip=0", "--set", "optim.weight_decay=0",
              "--set", "train.val_every=0", "--set", "train.val_batch_size=0")
    assert cfg.optim.min_lr_ratio == 0 and cfg.train.val_batch_size == 0
    assert cli("--set", "optim.min_lr_ratio=1").optim.min_lr_ratio == 1.0
    cfg = cli("--set", "checkpoint.keep_last=3", "--set", "checkpoint.keep_best=2")
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.keep_best) == (3, 2)


def test_yaml_1_1_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-2\nmodel:\n  dropout: 0\n")
    cfg = load(str(path))
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(5e-2)
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load(str(path))
    path.write_text("train:\n  max_steps: 1e3\n")  # an int field stays strict
    with pytest.raises(ConfigError, match="train.max_steps"):
        load(str(path))


@pytest.mark.parametrize("content,needle", [
    (b"optim: [1,\n", "not valid YAML at line 2"),
    (b"train:\n  max_steps: 5\n bad indent: 1\n", "not valid YAML"),
    (b"name: \xff\xfe\x00\n", "not UTF-8"),
    (b"base: [test]\n", "unknown base ['test']"),
    (b"base: {a: 1}\n", "unknown base"),
    (b"base: 5\n", "unknown base 5"),
    (b"x: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    (b"just a string\n", "expected a mapping"),
])
def test_broken_yaml_is_a_config_error_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


def test_yaml_that_is_a_folder_is_no_such_file(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "dir.yaml"))
