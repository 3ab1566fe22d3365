"""`python -m ray_job.checkpoints list|show|plot`: see what a run has, locally or on gs://.

    list  --storage S --run-name R [--json]     a table, newest last, with status
    show  NAME --storage S --run-name R [--json] one checkpoint's metadata and metrics
    plot  --storage S --run-name R [--out F.png] loss, LR and validation curves, resumes marked
    export NAME --storage S --run-name R --out DIR [--dtype fp32|bf16]
                                                    DIR/model.safetensors (whole, from any
                                                    checkpoint, sharded or not) + DIR/config.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from configs.schema import path_component_problem
from ray_job.errors import UserError
from storage.listing import scan
from storage.location import Location, StorageUnreachable, join, probe, resolve
from storage.manifest import DCP_METADATA, METRICS, MODEL, CheckpointError, Status, check
from storage.names import CheckpointName


def _run(args) -> Location:
    try:
        storage = resolve(args.storage)
    except ValueError as e:
        raise UserError(f"--storage {args.storage}: {e}") from None
    try:
        probe(storage)
    except StorageUnreachable as e:
        raise UserError(f"--storage {e}") from None
    problem = path_component_problem(args.run_name)
    if problem is not None:  # `..` would list (and show) folders outside --storage
        raise UserError(f"--run-name {problem}")
    return storage.child(args.run_name)


def rows(run: Location, verify: bool = False) -> list[dict]:
    """On GCS hashes are always checked (the server's MD5s: one listing, no download)."""
    out = []
    for entry in scan(run, verify_hashes=verify or run.is_gcs):
        result = entry.result
        meta = result.metadata
        out.append({
            "name": str(entry.name), "step": entry.name.step, "epoch": entry.name.epoch,
            "files": entry.name.files, "train_loss": meta.get("train_loss"),
            "val_loss": meta.get("val_loss"), "workers": meta.get("world_size"),
            "size": sum(f["size"] for f in meta.get("files", {}).values()) or None,
            "created_at": meta.get("created_at"), "status": result.status.value,
            "reason": result.reason, "uri": entry.loc.uri,
        })
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def cmd_list(args) -> int:
    run = _run(args)
    table = rows(run, verify=args.verify)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    if not table:
        print(f"No checkpoints in {run.uri}")
        return 0
    print(f"{'name':<40} {'step':>7} {'epoch':>5} {'files':>5} {'workers':>7} {'train':>8} {'val':>8} {'size':>8}  "
          f"{'created':<20} status")
    for r in table:
        print(f"{r['name']:<40} {r['step']:>7} {r['epoch']:>5} {r['files']:>5} {_fmt(r['workers'], 'd'):>7} "
              f"{_fmt(r['train_loss'], '.4f'):>8} {_fmt(r['val_loss'], '.4f'):>8} {_size(r['size']):>8}  "
              f"{r['created_at'] or '-':<20} {r['status']}{' (' + r['reason'] + ')' if r['reason'] else ''}")
    return 0


def cmd_show(args) -> int:
    run = _run(args)
    try:
        CheckpointName.parse(args.name)
    except ValueError as e:
        raise UserError(f"show {e}") from None
    loc = run.child(args.name)
    result = check(loc, verify_hashes=args.verify or loc.is_gcs)
    if not result.metadata and result.status is Status.INCOMPLETE:
        names = ", ".join(str(e.name) for e in scan(run)) or "none"
        raise UserError(f"No files found for checkpoint {args.name} in {run.uri} "
                        f"(or it has no metadata.json). Checkpoints there: {names}")
    metrics = {}
    try:
        with loc.fs.open_input_stream(join(loc.path, METRICS)) as f:
            metrics = json.loads(f.read())
    except (OSError, ValueError):
        pass
    report = {"name": args.name, "uri": loc.uri, "status": result.status.value,
              "reason": result.reason, "metadata": result.metadata, "metrics": metrics}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = result.metadata
    print(f"{args.name}  [{result.status.value}{': ' + result.reason if result.reason else ''}]")
    print(f"  uri:            {loc.uri}")
    for key in ("step", "epoch", "files_processed", "samples_in_epoch", "best_loss", "best_val_loss",
                "train_loss", "val_loss", "world_size", "strategy", "global_batch_size", "created_at", "run_name"):
        if key in meta:
            print(f"  {key + ':':<20}{meta[key]}")
    if meta.get("resumed_from"):
        print(f"  resumed_from:   {meta['resumed_from']['name']}")
    writer = {f: r for r, files in (meta.get("shards") or {}).items() for f in files}
    for rel, info in sorted(meta.get("files", {}).items()):
        by = f"  rank {writer[rel]}" if rel in writer else ""
        print(f"  {rel:<28} {_size(info['size']):>8}  sha256 {info['sha256'][:16]}...{by}")
    if metrics:
        print(f"  history: {len(metrics.get('loss_history', []))} loss, {len(metrics.get('lr_history', []))} LR, "
              f"{len(metrics.get('val_history', []))} validation entries; resumes at "
              f"{[r[0] for r in metrics.get('resumes', [])] or 'none'}")
    return 0


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = _run(args)
    complete = [r for r in rows(run) if r["status"] == "complete"]
    if not complete:
        raise UserError(f"plot: no complete checkpoint in {run.uri} to read training_metrics.json from")
    newest = run.child(complete[-1]["name"])
    with newest.fs.open_input_stream(join(newest.path, METRICS)) as f:
        metrics = json.loads(f.read())
    if args.source == "tensorboard":  # the same curves, from the run's event files (every step)
        curves = _tensorboard_scalars(run)
        metrics.update({"loss_history": curves.get("train/loss", []), "lr_history": curves.get("train/lr", []),
                        "val_history": curves.get("val/loss", [])})
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.4]})
    loss = metrics.get("loss_history", [])
    val = metrics.get("val_history", [])
    lr = metrics.get("lr_history", [])
    if loss:
        ax_loss.plot(*zip(*loss), color="#1f77b4", lw=1.2, label="train loss")
    if val:
        ax_loss.plot(*zip(*val), "o-", color="#d62728", lw=1.5, ms=4, label="validation loss")
    if lr:
        ax_lr.plot(*zip(*lr), color="#2ca02c", lw=1.2)
    for i, (step, name) in enumerate(metrics.get("resumes", [])):
        for ax in (ax_loss, ax_lr):
            ax.axvline(step, color="#7f7f7f", ls="--", lw=1, label="resumed" if ax is ax_loss and i == 0 else None)
        ax_loss.annotate(f"resumed\n{name.replace('checkpoint-', '')}", (step, 0), xycoords=("data", "axes fraction"),
                         xytext=(3, 4), textcoords="offset points", va="bottom", fontsize=7, color="#555555")
    for r in complete:
        ax_loss.axvline(r["step"], color="#bbbbbb", lw=0.5, zorder=0)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{args.run_name}: {complete[-1]['name']}  ({len(complete)} checkpoints, grey lines)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = args.out or f"{args.run_name}-curves.png"
    fig.savefig(out, dpi=120)
    print(f"Wrote {os.path.abspath(out)}")
    return 0


def _tensorboard_scalars(run) -> dict[str, list[list[float]]]:
    """{tag: [[step, value]]} from {run}/tensorboard/, read as TensorBoard reads it (a resume's
    purge step hides what an earlier attempt logged past it); gs:// objects are downloaded."""
    import tempfile

    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run.child("tensorboard")
    with tempfile.TemporaryDirectory(prefix="tensorboard-") as scratch:
        local = folder.path
        if not folder.is_local:
            pafs.copy_files(folder.path, scratch, source_filesystem=folder.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            local = scratch
        if not os.path.isdir(local) or not os.listdir(local):
            raise UserError(f"plot --from tensorboard: no event files in {folder.uri}")
        acc = EventAccumulator(local, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def cmd_export(args) -> int:
    """One consolidated model.safetensors (and the model's config as JSON) for inference, from a
    ddp or fsdp checkpoint, local or gs://: no Ray, no GPU, no process group. Every file read is
    checked against metadata.json's sha256; a sharded one is read through trainers/sharded.py's
    safe reader (nothing unpickled outside its allow-list)."""
    import shutil
    import tempfile

    run = _run(args)
    try:
        CheckpointName.parse(args.name)
    except ValueError as e:
        raise UserError(f"export {e}") from None
    out = os.path.abspath(args.out)
    targets = [os.path.join(out, MODEL), os.path.join(out, "config.json")]
    taken = [t for t in targets if os.path.exists(t)]
    if taken:
        raise UserError(f"export --out {args.out}: {taken[0]} exists; give an empty or new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"export --out {args.out}: a file, not a folder")
    loc = run.child(args.name)
    result = check(loc)
    if not result.ok:
        raise UserError(f"export {args.name}: checkpoint {loc.uri} is {result.status.value} "
                        f"({result.reason}); pick a complete one (see `list`)")
    meta = result.metadata
    strategy = meta.get("strategy", "ddp")
    scratch = tempfile.mkdtemp(prefix="export-")
    try:
        from safetensors.torch import load_file, save_file

        from storage import transfer

        try:
            if strategy == "fsdp":
                from trainers import sharded

                folder = transfer.fetch(loc, scratch, wanted=lambda rel: rel == DCP_METADATA)

                fetched: set[str] = set()

                def fetch_shards(rels: list[str]) -> None:
                    todo = [rel for rel in rels if rel not in fetched]
                    transfer.fetch_files(loc, folder, todo, meta["files"])
                    fetched.update(todo)

                def read(rel: str, offset: int, length: int) -> bytes:
                    fetch_shards([rel])
                    with open(os.path.join(folder, rel), "rb") as f:
                        f.seek(offset)
                        return f.read(length)

                try:  # the whole checkpoint vetted as a resume would be, not only the weights read
                    with open(os.path.join(folder, DCP_METADATA), "rb") as f:
                        sharded.vet(f, set(meta["files"]), read)
                    weights = sharded.full_model_state(folder, set(meta["files"]), before_read=fetch_shards)
                except sharded.UnsafeCheckpoint as e:
                    raise UserError(f"export {args.name}: refused ({e}); nothing of it was run") from None
            else:
                folder = transfer.fetch(loc, scratch, wanted=lambda rel: rel == MODEL)
                weights = load_file(os.path.join(folder, MODEL))
        except CheckpointError as e:
            raise UserError(f"export {args.name}: {e}") from None
        os.makedirs(out, exist_ok=True)
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]  # --dtype: floating tensors
        weights = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
        save_file(weights, targets[0])
        with open(targets[1], "w") as f:
            json.dump({"model": meta["config"]["model"], "checkpoint": args.name, "step": meta["step"],
                       "written_by": strategy, "world_size": meta["world_size"], "dtype": args.dtype}, f, indent=2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(v.numel() * v.element_size() for v in weights.values())
    print(f"Wrote {targets[0]} ({len(weights)} tensors, {args.dtype}, {_size(size)}) and {targets[1]} from "
          f"{args.name} ({strategy}, {meta['world_size']} workers)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_job.checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("list", "show", "plot", "export"):
        s = sub.add_parser(name)
        s.add_argument("--storage", default="./runs", help="local folder or gs://bucket/prefix")
        s.add_argument("--run-name", default="test")
        if name in ("show", "export"):
            s.add_argument("name")
        if name == "export":
            s.add_argument("--out", required=True, help="folder for model.safetensors and config.json")
            s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                           help="the exported weights' dtype (default fp32, as trained)")
        if name in ("list", "show"):
            s.add_argument("--verify", action="store_true",
                           help="check every file's hash too (always done on gs://)")
        if name in ("list", "show"):
            s.add_argument("--json", action="store_true")
        if name == "plot":
            s.add_argument("--out", help="PNG file to write (default RUN-curves.png)")
            s.add_argument("--from", dest="source", choices=("checkpoint", "tensorboard"), default="checkpoint",
                           help="the newest checkpoint's training_metrics.json (default), or the run's "
                                "TensorBoard event files")
    args = p.parse_args(argv)
    try:
        return {"list": cmd_list, "show": cmd_show, "plot": cmd_plot, "export": cmd_export}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
