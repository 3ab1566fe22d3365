"""`python -m ray_job.train`: parse, resolve, validate, train. Exit 0 done, 2 bad input, 1 failure."""

from __future__ import annotations

import os
import sys
import uuid

from configs import ConfigError, with_overrides
from ray_job.cli import parser, resolve_config
from ray_job.errors import UserError


def prepare(argv: list[str] | None = None) -> tuple:
    """Everything that can fail because of user input, done before Ray starts."""
    from data import checks
    from ray_job import model_check, resume
    from storage.location import StorageUnreachable, probe, resolve
    from trainers.launch_plan import LaunchPlan, ResumePoint

    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    model_check.check_importable(cfg)
    try:
        storage = resolve(cfg.checkpoint.storage)
        data = resolve(cfg.data.path)
    except ValueError as e:
        raise UserError(f"--storage/data.path: {e}") from None
    try:
        probe(storage.child(cfg.run_name), writable=True)  # the run folder: a file, read-only, full
        probe(data)
    except StorageUnreachable as e:
        raise UserError(f"--storage/data.path {e}") from None
    run = storage.child(cfg.run_name)
    # Workers run elsewhere (another cwd, another node): hand them absolute locations.
    cfg = with_overrides(cfg, {"data": {"path": data.uri}, "checkpoint": {"storage": storage.uri}})
    choice = resume.resolve_resume(args.resume, run) if args.resume else None
    if choice is not None:
        resume.check_compatible(choice, cfg, cfg.train.max_steps, args.allow_new_global_batch)
        forking = not choice.loc.uri.startswith(run.uri.rstrip("/") + "/")
        warning = model_check.check_same_model(choice.metadata.get("config"), cfg, choice.name, forking)
        if warning:
            print(warning)
        if choice.metadata["world_size"] != cfg.scaling.num_workers:
            print(f"⚠️  {choice.name} was written by {choice.metadata['world_size']} workers; "
                  f"resuming on {cfg.scaling.num_workers} with the same global batch size")
    resume.check_no_overwrite(run, choice)
    if choice is not None:
        # the files it trained on, found under this data.path and fingerprinted (footers only)
        index = checks.resume_index(data, choice.metadata, choice.name)
        checks.check_val(data, cfg)
    else:  # prepares the test corpus if asked; checks the folder, the files, one sample's length
        index = checks.fresh_index(data, cfg, verbose=args.verbose)
    token_dtype = checks.token_dtype(data, cfg)  # dataset.json's width (uint8: byte tokens)
    if choice is not None:
        note = resume.check_same_order(choice, cfg, token_dtype)
        if note:
            print(note)
    if index.total_rows < cfg.train.global_batch_size:
        raise UserError(f"data.path {data.uri}: {index.total_rows} train samples, fewer than one "
                        f"global batch ({cfg.train.global_batch_size}); lower "
                        "--set train.global_batch_size or add data")
    plan = LaunchPlan(
        config=cfg, launch_id=uuid.uuid4().hex, run_uri=run.uri, data_index=index,
        resume=ResumePoint(name=choice.name, uri=choice.loc.uri, step=choice.step,
                           epoch=int(choice.metadata["epoch"]),
                           samples_in_epoch=int(choice.metadata["samples_in_epoch"])) if choice else None,
        audit_dir=os.path.abspath(args.audit_dir) if args.audit_dir else None,
        verbose=args.verbose,
        token_dtype=token_dtype,
    )
    if choice is not None:
        print(f"🔎 --resume {args.resume} -> {choice.loc.uri} (step {choice.step}, verified)")

    return cfg, storage, run, plan


def main(argv: list[str] | None = None) -> int:
    from ray_job import ownership

    lease = None
    try:
        try:
            cfg, storage, run, plan = prepare(argv)
            lease = ownership.take_run(cfg, run, plan)  # one launch writes a run; before Ray
        except (UserError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from ray_job import launch

        print(f"🚀 Run '{cfg.run_name}': checkpoints in {run.uri}, {cfg.scaling.num_workers} workers, "
              f"max_steps {cfg.train.max_steps}")
        try:
            launch.init_ray(cfg, verbose=plan.verbose)
        except Exception as e:  # no cluster at RAY_ADDRESS, a malformed address, ...
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"❌ Ray did not start: {type(e).__name__}: {first} (RAY_ADDRESS="
                  f"{os.environ.get('RAY_ADDRESS') or 'unset: a local Ray'})", file=sys.stderr)
            return 1
        try:
            result = launch.fit(cfg, run, storage, plan, verbose=plan.verbose)
        except SystemExit:  # fit() installs Ray Train's Ctrl-C handler: it aborts the run, then exits
            raise KeyboardInterrupt from None
        except Exception as e:  # Ray wraps worker errors; the traceback is in the log above
            print(f"❌ Training failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        metrics = result.metrics or {}
        step, epoch = metrics.get("step"), metrics.get("epoch")
        # The run's newest whole checkpoint, from storage: after a restart that trained nothing
        # new (a worker lost while the last checkpoints uploaded), Ray's last result is older.
        from storage import listing

        newest = next((e for e in reversed(listing.scan(run)) if e.result.ok), None)
        if newest is not None and (step is None or newest.name.step > step):
            step, epoch = newest.name.step, newest.name.epoch
        print(f"🏁 Done: step {step}, epoch {epoch}, last checkpoint "
              f"{newest.name if newest else None} (progress started at step "
              f"{metrics.get('progress_initial')})")
        return 0
    except KeyboardInterrupt:
        if lease is not None and lease.lost:  # ownership said why already
            return 1
        print("error: interrupted (Ctrl-C or a stop signal); complete checkpoints are kept, one "
              "being written stays incomplete and is never resumed", file=sys.stderr)
        return 130
    finally:
        if lease is not None:
            lease.release()


if __name__ == "__main__":
    sys.exit(main())
