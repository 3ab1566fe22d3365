"""`python -m ray_job.train`: parse, resolve, validate, train. Exit 0 done, 2 bad input, 1 failure."""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid

from configs import ConfigError, with_overrides
from ray_job.cli import parser, resolve_config
from ray_job.errors import UserError


def prepare(argv: list[str] | None = None, dry: bool = False, unchecked: list | None = None) -> tuple:
    """Everything that can fail because of user input, done before Ray starts.

    dry (the launch plan, ray_job/plan.py): write nothing (no write probe, no test corpus) and
    note in `unchecked`, as (what, why), each check this machine cannot make (an unreachable
    bucket) instead of failing; data.index is then None where the data was not read."""
    from data import checks, corpus
    from data.prepare import token_dtype as width_for
    from ray_job import model_check, resume
    from storage.location import StorageUnreachable, probe, resolve
    from trainers.launch_plan import InitFrom, LaunchPlan, ResumePoint

    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    model_check.check_importable(cfg)
    from trainers import tracking

    absent = tracking.missing(cfg.logging.trackers)
    if absent:
        raise UserError(f"logging.trackers: {', '.join(absent)} not installed here (pip install "
                        f"{' '.join(tracking.MODULES[t] for t in absent)}), or log without it: "
                        "--set logging.trackers=[tensorboard]")
    try:
        storage = resolve(cfg.checkpoint.storage)
        data = resolve(cfg.data.path)
    except ValueError as e:
        raise UserError(f"--storage/data.path: {e}") from None
    reached = {}
    # dry: no write probe on GCS (it writes an object); locally the probe only asks the file system
    for what, loc, writable in (("--storage", storage.child(cfg.run_name), not (dry and storage.is_gcs)),
                                ("data.path", data, False)):
        try:
            probe(loc, writable=writable)  # the run folder: a file, read-only, full
            reached[what] = True
        except StorageUnreachable as e:
            if not (dry and loc.is_gcs):
                raise UserError(f"--storage/data.path {e}") from None
            unchecked.append((what, str(e)))
            reached[what] = False
    run = storage.child(cfg.run_name)
    # Workers run elsewhere (another cwd, another node): hand them absolute locations.
    cfg = with_overrides(cfg, {"data": {"path": data.uri}, "checkpoint": {"storage": storage.uri}})
    if args.resume and not reached["--storage"]:
        unchecked.append(("--resume", f"{args.resume}: the run's checkpoints cannot be read from here"))
    choice = resume.resolve_resume(args.resume, run) if args.resume and reached["--storage"] else None
    if choice is not None:
        resume.check_compatible(choice, cfg, cfg.train.max_steps, args.allow_new_global_batch)
        forking = not choice.loc.uri.startswith(run.uri.rstrip("/") + "/")
        warning = model_check.check_same_model(choice.metadata.get("config"), cfg, choice.name, forking)
        if warning:
            print(warning)
        if choice.metadata["world_size"] != cfg.scaling.num_workers:
            print(f"⚠️  {choice.name} was written by {choice.metadata['world_size']} workers; "
                  f"resuming on {cfg.scaling.num_workers} with the same global batch size")
    if reached["--storage"]:
        resume.check_no_overwrite(run, choice)
    init_from = None
    if args.init_from and choice is not None:
        print(f"ℹ️  --init-from {args.init_from} ignored: resuming {choice.name}, the run continues "
              "from its own weights (so a job keeps the same arguments across restarts)")
    elif args.init_from:
        from ray_job import init_from as init_check

        try:
            init_from = init_check.check(args.init_from, cfg, hash_it=not dry)  # the header; the hash
        except init_check.Unreachable as e:
            if not dry:
                raise
            unchecked.append(("--init-from", str(e).removeprefix("--init-from ")))
    if choice is not None and choice.metadata.get("init_from"):  # recorded, not loaded
        init_from = InitFrom(**choice.metadata["init_from"])
    index, token_dtype = None, None
    if not reached["data.path"] or (dry and choice is None and cfg.data.prepare == "stdlib"
                                    and not corpus.is_prepared(data, cfg)):
        if reached["data.path"]:
            unchecked.append(("data.path", f"{data.uri} holds no corpus yet; train prepares the test "
                                           "corpus there first (data.prepare=stdlib)"))
    elif choice is not None:
        # the files it trained on, found under this data.path and fingerprinted (footers only)
        index = checks.resume_index(data, choice.metadata, choice.name)
        checks.check_val(data, cfg)
    else:  # prepares the test corpus if asked; checks the folder, the files, one sample's length
        index = checks.fresh_index(data, cfg, verbose=args.verbose)
    if index is not None and reached["data.path"]:
        token_dtype = checks.token_dtype(data, cfg)  # dataset.json's width (uint8: byte tokens)
    if choice is not None and token_dtype is not None:
        note = resume.check_same_order(choice, cfg, token_dtype)
        if note:
            print(note)
        resume.check_window_kept(choice, index.total_rows, cfg.train.global_batch_size)
    if index is not None and index.total_rows < cfg.train.global_batch_size:
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
        token_dtype=token_dtype or width_for(cfg.model.vocab_size),
        init_from=init_from,
    )
    if choice is not None:
        print(f"🔎 --resume {args.resume} -> {choice.loc.uri} (step {choice.step}, verified)")

    return cfg, storage, run, plan


def main(argv: list[str] | None = None) -> int:
    from ray_job import ownership

    lease = plan = None
    try:
        try:
            cfg, storage, run, plan = prepare(argv)
            if cfg.scaling.use_gpu:  # what a GPU needs, known before a cluster is paid for
                from ray_job.plan import warn_memory

                warn_memory(cfg)
            lease = ownership.take_run(cfg, run, plan)  # one launch writes a run; before Ray
            from trainers import snapshots

            snapshots.clear_earlier(run.uri, plan.launch_id)  # a killed launch's, on this node
        except (UserError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from ray_job import launch

        workers = (f"{cfg.scaling.min_workers}..{cfg.scaling.num_workers} workers (elastic)" if cfg.scaling.elastic
                   else f"{cfg.scaling.num_workers} workers")
        print(f"🚀 Run '{cfg.run_name}': checkpoints in {run.uri}, {workers}, "
              f"max_steps {cfg.train.max_steps}")
        try:
            launch.init_ray(cfg, verbose=plan.verbose)
        except Exception as e:  # no cluster at RAY_ADDRESS, a malformed address, ...
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"❌ Ray did not start: {type(e).__name__}: {first} (RAY_ADDRESS="
                  f"{os.environ.get('RAY_ADDRESS') or 'unset: a local Ray'})", file=sys.stderr)
            return 1
        stop = GracefulStop(plan.launch_id, cfg.checkpoint.drain_timeout_s, lease)
        try:
            result = stop.run(lambda: launch.fit(cfg, run, storage, plan, verbose=plan.verbose))
        except Exception as e:  # Ray wraps worker errors; the traceback is in the log above
            print(f"❌ Training failed: {type(e).__name__}: {e}", file=sys.stderr)
            left = _incomplete(plan.launch_id, run)
            if left:  # a lost writer (a killed worker or node) takes its unfinished uploads along
                print(f"❌ Saved and not committed, so incomplete and never resumed: {', '.join(left)}",
                      file=sys.stderr)
            return 1
        if stop.asked:
            left = _incomplete(plan.launch_id, run)
            if left:  # the drain ran out of checkpoint.drain_timeout_s (the workers said so too)
                print(f"🛑 Saved and not committed, so incomplete and never resumed: {', '.join(left)}",
                      file=sys.stderr)
            newest = _newest(run)
            print(f"🛑 Stopped: the newest committed checkpoint is {newest.name if newest else None}; "
                  "continue with --resume latest", file=sys.stderr)
            return 130
        metrics = result.metrics or {}
        step, epoch = metrics.get("step"), metrics.get("epoch")
        # The run's newest whole checkpoint, from storage: after a restart that trained nothing
        # new (a worker lost while the last checkpoints uploaded), Ray's last result is older.
        newest = _newest(run)
        if newest is not None and (step is None or newest.name.step > step):
            step, epoch = newest.name.step, newest.name.epoch
        left = _incomplete(plan.launch_id, run)
        if left:  # a commit refused (a rank did not report its files): the workers said why
            print(f"⚠️  Saved and not committed, so incomplete and never resumed: {', '.join(left)}",
                  file=sys.stderr)
        print(f"🏁 Done: step {step}, epoch {epoch}, last checkpoint "
              f"{newest.name if newest else None} (progress started at step "
              f"{metrics.get('progress_initial')})")
        return 0
    except KeyboardInterrupt:
        if plan is None:
            print("error: interrupted before training started; nothing was written", file=sys.stderr)
            return 130
        if lease is not None and lease.lost:  # ownership said why already
            _stopped_at_once(plan.launch_id, run, lease_lost=True)
            return 1
        _stopped_at_once(plan.launch_id, run)
        return 130
    finally:
        if lease is not None:
            lease.release()
        if plan is not None:
            from trainers import snapshots

            snapshots.remove(run.uri, plan.launch_id)  # this node's part; workers remove theirs


def _newest(run):
    """The run's newest whole checkpoint in storage (sizes checked, not hashes)."""
    from storage import listing

    return next((e for e in reversed(listing.scan(run)) if e.result.ok), None)


def _incomplete(launch_id: str, run, saved: list[str] | None = None) -> list[str]:
    """The checkpoints this launch's rank 0 saved, in any attempt, and did not commit (saved: as
    read before), confirmed in storage (a commit whose record was lost with its worker)."""
    from storage import manifest
    from trainers import stopping

    names = stopping.uncommitted(launch_id) if saved is None else saved
    return [n for n in names if not manifest.check(run.child(n)).ok]


def _stopped_at_once(launch_id: str, run, lease_lost: bool = False) -> None:
    """A second Ctrl-C, or a lost lease: stop the workers, say which saved checkpoints stay
    incomplete."""
    from trainers import stopping

    saved = stopping.uncommitted(launch_id)  # read while Ray is up
    if "ray" in sys.modules:  # stop the workers now: nothing more reaches storage
        import ray

        ray.shutdown()
    incomplete = _incomplete(launch_id, run, saved)
    if lease_lost:  # ownership said why; the run is another launch's now
        if incomplete:
            print(f"❌ Saved and not committed, so incomplete and never resumed: {', '.join(incomplete)}",
                  file=sys.stderr)
        return
    newest = _newest(run)
    print("🛑 Stopped at once: " + (f"{', '.join(incomplete)} were saved and not committed: they "
          "stay incomplete and are never resumed; " if incomplete else "every saved checkpoint was "
          "committed; ") + f"the newest committed checkpoint is {newest.name if newest else None}",
          file=sys.stderr)


class GracefulStop:
    """Ctrl-C or SIGTERM (what `ray job stop` sends) while training: ask the workers to stop at
    the next step and finish the checkpoints already saved (trainers/stopping.py); a second
    signal stops at once (KeyboardInterrupt). Ray Train's fit runs in a thread so that these
    handlers are ours (fit installs its own, which aborts the run, only on the main thread)."""

    def __init__(self, launch_id: str, drain_timeout_s: float, lease):
        self.launch_id, self.drain_timeout_s, self.lease = launch_id, drain_timeout_s, lease
        self.asked = False

    def _handler(self, signum, frame):
        if self.asked or (self.lease is not None and self.lease.lost):
            raise KeyboardInterrupt
        from trainers import stopping

        self.asked = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n🛑 {name}: stopping at the next step, then finishing the checkpoints already saved "
              f"(up to checkpoint.drain_timeout_s = {self.drain_timeout_s:g}s); Ctrl-C again to stop "
              "at once", file=sys.stderr, flush=True)
        stopping.request(self.launch_id)

    def run(self, fit):
        box: dict = {}

        def target():
            try:
                box["result"] = fit()
            except BaseException as e:  # handed to the main thread
                box["error"] = e

        thread = threading.Thread(target=target, name="fit", daemon=True)
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            thread.start()
            while thread.is_alive():
                thread.join(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if "error" in box:
            raise box["error"]
        return box["result"]


if __name__ == "__main__":
    code = main()
    if code in (1, 130) and "ray" in sys.modules:
        # Ray Train's fit may still be inside Ray in its thread (a stop at once, a lost lease): end here, as
        # interpreter teardown under it can crash; everything of ours is released already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
