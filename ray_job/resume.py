"""Resolve --resume to one complete checkpoint, on the driver, before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import Config
from ray_job import vet
from ray_job.errors import UserError
from storage.listing import Entry, latest_complete, scan
from storage.location import Location, StorageUnreachable, probe, resolve
from storage.manifest import METADATA
from storage.names import CheckpointName


@dataclass(frozen=True)
class ResumeChoice:
    name: str
    loc: Location
    metadata: dict

    @property
    def step(self) -> int:
        return int(self.metadata["step"])


def _existing(run: Location) -> str:
    names = [str(e.name) for e in scan(run)]
    return ", ".join(names) if names else "none"


def resolve_resume(arg: str, run: Location) -> ResumeChoice:
    """`latest`, a checkpoint name in this run, or a full path/URI to a checkpoint folder."""
    if arg == "latest":
        entry = latest_complete(run)
        if entry is None:
            raise UserError(
                f"--resume latest: no complete checkpoint in {run.uri} "
                f"(checkpoints there: {_existing(run)}); start without --resume, or check "
                "--storage and --run-name"
            )
    elif "/" in arg or "://" in arg:
        entry = Entry.at(_checkpoint_folder(arg), verify_hashes=True)
        if entry.empty:
            raise UserError(f"No files found for checkpoint {arg}: nothing at {entry.loc.uri}")
    else:
        try:
            CheckpointName.parse(arg)
        except ValueError as e:
            raise UserError(f"--resume {e}") from None
        entry = Entry.at(run.child(arg), verify_hashes=True)
        if entry.empty:
            raise UserError(
                f"No files found for checkpoint {arg} in {run.uri}. Checkpoints there: "
                f"{_existing(run)}. Check the name, --storage and --run-name, or use --resume latest"
            )
    result = entry.result
    if not result.ok:
        raise UserError(
            f"--resume {arg}: checkpoint {entry.loc.uri} is {result.status.value} ({result.reason}) and "
            f"cannot be resumed; pick a complete one (--resume latest skips incomplete ones)"
        )
    vet.checkpoint(arg, entry.loc, result.metadata)  # a hostile one: refused before Ray starts
    return ResumeChoice(name=str(entry.name), loc=entry.loc, metadata=result.metadata)


def _checkpoint_folder(arg: str) -> Location:
    """--resume PATH/URI: a folder named like a checkpoint, reachable, before anything is listed
    (a file, `/` or a big folder is refused by its name, never walked)."""
    import pyarrow.fs as pafs

    try:
        loc = resolve(arg)
    except ValueError as e:
        raise UserError(f"--resume {arg}: {e}") from None
    if loc.is_gcs:
        try:
            probe(loc)  # no credentials or no bucket: seconds, not a minute of retries
        except StorageUnreachable as e:
            raise UserError(f"--resume {e}") from None
    folder = loc.path.rstrip("/").rsplit("/", 1)[-1]
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        parent = loc.uri.rstrip("/").rsplit("/", 1)[0]
        hint = f" (--resume {parent}?)" if folder == METADATA else ""
        raise UserError(f"--resume {arg}: {loc.uri} is a file; give the checkpoint folder that "
                        f"holds metadata.json{hint}")
    if CheckpointName.try_parse(folder) is None:
        raise UserError(f"--resume {arg}: {loc.uri} is not a checkpoint folder (its name is not "
                        "checkpoint-epoch{E}-step{S}-files{F}); give a checkpoint folder, a "
                        "checkpoint name in this run, or latest")
    return loc


ARCHITECTURE = ("vocab_size", "seq_len", "n_layer", "n_head", "d_model")  # dropout may change


def check_compatible(choice: ResumeChoice, cfg: Config, max_steps: int,
                     allow_new_global_batch: bool = False) -> None:
    """Refuse a resume that cannot continue this config."""
    saved = choice.metadata.get("config", {}).get("model", {})
    ours = _asdict(cfg.model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {ours[k]!r}"
             for k in ARCHITECTURE if saved.get(k) != ours[k]]
    if diffs:
        raise UserError(
            f"--resume {choice.name}: the checkpoint holds an incompatible model "
            f"({'; '.join(diffs)}); resume with the config it was trained with"
        )
    old_batch, new_batch = choice.metadata["global_batch_size"], cfg.train.global_batch_size
    if old_batch != new_batch:
        if not allow_new_global_batch:
            raise UserError(
                f"--resume {choice.name}: the checkpoint used global batch size {old_batch}, this "
                f"config {new_batch}; keep it (--set train.global_batch_size={old_batch}) or pass "
                "--allow-new-global-batch to change it on purpose"
            )
        cursor = choice.metadata["samples_in_epoch"]
        if cursor % new_batch:
            raise UserError(
                f"--allow-new-global-batch: {choice.name} stopped {cursor} samples into epoch "
                f"{choice.metadata['epoch']}, not a multiple of the new global batch size "
                f"{new_batch}; pick a size that divides {cursor} or resume from an epoch boundary"
            )
    if max_steps <= choice.step:
        raise UserError(
            f"--max-steps {max_steps} is not above the resumed step {choice.step} of "
            f"{choice.name}: pass --max-steps greater than {choice.step}"
        )


def check_same_order(choice: ResumeChoice, cfg: Config, token_dtype: str) -> str | None:
    """Refuse to change the sample order mid-epoch (samples would repeat or be skipped); at an
    epoch boundary it may change: returns a line saying so."""
    from data.order import sample_order

    meta = choice.metadata
    saved_seed = meta.get("config", {}).get("data", {}).get("shuffle_seed", 0)
    saved = meta.get("sample_order") or {"shuffle": "files", "window": 0, "seed": saved_seed}
    ours = sample_order(cfg, token_dtype)
    if saved == ours:
        return None
    what = (f"shuffle={saved['shuffle']}, window {saved['window']}, seed {saved['seed']} -> "
            f"shuffle={ours['shuffle']}, window {ours['window']}, seed {ours['seed']}")
    if meta["samples_in_epoch"]:
        raise UserError(
            f"--resume {choice.name}: it stopped {meta['samples_in_epoch']} samples into epoch {meta['epoch']} "
            f"in another sample order ({what}); changing it mid-epoch would repeat and skip samples. Keep "
            f"--set data.shuffle={saved['shuffle']} --set data.shuffle_window={saved['window']} "
            f"--set data.shuffle_seed={saved['seed']}, or resume from an epoch boundary"
        )
    return f"⚠️  {choice.name} is at an epoch boundary: the sample order changes from here ({what})"


def check_window_kept(choice: ResumeChoice, total_rows: int, new_batch: int) -> None:
    """Another global batch mid-epoch (--allow-new-global-batch) only where the window in progress
    is cut alike under both sizes: the epoch's last window ends at (N // G) * G and is shuffled by
    a permutation of its length (data/order.py), so a resume inside it with another G would train
    some of its samples twice and others never. Windows before the last are the same under any G."""
    from data.order import window_in_progress

    meta = choice.metadata
    old_batch, cursor = meta["global_batch_size"], meta["samples_in_epoch"]
    window = (meta.get("sample_order") or {}).get("window", 0)  # none recorded: file order, no windows
    before = window_in_progress(total_rows, window, old_batch, cursor)
    after = window_in_progress(total_rows, window, new_batch, cursor)
    if before == after:
        return
    epoch_end = choice.step + (total_rows // old_batch * old_batch - cursor) // old_batch
    raise UserError(
        f"--allow-new-global-batch: {choice.name} stopped {cursor} samples into epoch {meta['epoch']}, "
        f"inside shuffle window [{before[0]}, {before[1]}), which global batch size {new_batch} would cut at "
        f"{after[1]} and shuffle otherwise: samples would repeat and be skipped. Finish the epoch with global "
        f"batch size {old_batch} (--max-steps {epoch_end}), then resume with {new_batch} from its end, or resume "
        f"a checkpoint at a window's start (samples_in_epoch a multiple of {window})"
    )


def check_no_overwrite(run: Location, choice: ResumeChoice | None) -> None:
    """Never let this run write names that a newer checkpoint of the same run already has.

    The rule is decided here, on the driver, before any worker starts, so every rank agrees.
    """
    complete = [e for e in scan(run) if e.result.ok]
    if choice is None and complete:
        raise UserError(
            f"run '{run.uri}' already has checkpoints (newest: {complete[-1].name}); "
            "continue it with --resume latest, or start a new run with --run-name NEW"
        )
    if choice is not None:
        newer = [e for e in complete if e.name.step > choice.step]
        if newer:
            raise UserError(
                f"--resume {choice.name}: run {run.uri} already has newer checkpoints "
                f"({', '.join(str(e.name) for e in newer)}) that resuming here would overwrite; "
                f"fork into a new run with --run-name NEW --resume {choice.loc.uri} (keeps these), "
                "or --resume latest"
            )


def _asdict(dc) -> dict:
    import dataclasses

    return dataclasses.asdict(dc)
