"""ddp against fsdp, side by side in one run: 2 CPU workers, the same 12.6M-parameter GPT (a 150
MB checkpoint of weights and AdamW state), checkpoints to the GCS API server on loopback.

1. Per-rank bytes written per checkpoint / the checkpoint's state bytes (fsdp target <= 0.55;
   ddp is 1.0: rank 0 writes everything).
2. Per-rank parameter + gradient + AdamW memory, fsdp / ddp (target <= 0.6).
3. Synchronous save (the loop blocked while the state is written, hashed and uploaded),
   fsdp / ddp.
4. Steps/s, fsdp / ddp (report; target on CPU >= 0.6).
5. Async stall / synchronous save, each strategy (target <= 0.02): the loop blocked only while
   the state is staged in memory.

    python benchmarks/bench_sharded.py [--quick]

--quick (the test suite's smoke run): a tiny model and only the two async runs; the
synchronous save is then estimated from the background write + upload time, and says so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

import _common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, every, sets = _common.checkpoint_workload("sharded", args.quick)
    sets += ["scaling.cpus_per_worker=0.5"]
    modes = ("async",) if args.quick else ("sync", "async")
    gcs = _common.GcsServer()
    results: dict[tuple[str, str], dict] = {}
    try:
        for strategy in ("ddp", "fsdp"):
            for mode in modes:
                cmd = ["--config", "test", "--num-workers", 2, "--storage", f"gs://bench/{strategy}-{mode}",
                       "--run-name", "r", "--max-steps", steps, "--checkpoint-every", every,
                       "--set", f"checkpoint.upload={mode}", "--set", f"train.strategy={strategy}"]
                for s in sets:
                    cmd += ["--set", s]
                run = _common.run_cli(cmd, gcs.url)
                assert run.rc == 0, run.out[-3000:]
                out = run.out
                held = re.search(r"params ([\d.]+) MB, grads ([\d.]+) MB, AdamW ([\d.]+) MB", out)
                results[(strategy, mode)] = {
                    "stalls": _common.floats(r"Training blocked ([\d.]+)s", out),
                    "background": _common.floats(r"written and uploaded in ([\d.]+)s", out),
                    "rate": _common.floats(r"steps after the first at ([\d.]+) steps/s", out)[0],
                    "memory": sum(float(x) for x in held.groups()),
                    "final": _final_metadata(f"gs://bench/{strategy}-{mode}/r"),
                }
    finally:
        gcs.stop()

    def median(xs):  # the first save pays one-time setup (a gloo group, DCP's planner caches)
        return statistics.median(xs[1:] or xs)

    print(f"2 workers, {steps} steps, a checkpoint every {every}; checkpoints to the GCS API server")
    for strategy in ("ddp", "fsdp"):
        meta = results[(strategy, "async")]["final"]
        sizes = {f: v["size"] for f, v in meta["files"].items()}
        state = sum(s for f, s in sizes.items() if f.endswith(".distcp") or f in
                    (".metadata", "model.safetensors", "optimizer.pt"))
        by_rank = ({int(r): sum(sizes[f] for f in files) for r, files in meta["shards"].items()}
                   if "shards" in meta else {0: sum(sizes.values())})
        print(f"1. {strategy}: checkpoint state {state / 2**20:.1f} MB; bytes written per rank "
              f"{[round(b / 2**20, 1) for _, b in sorted(by_rank.items())]} MB; max per rank / state "
              f"{max(by_rank.values()) / state:.3f}" + ("  (target <= 0.55)  " + (
                  "OK" if max(by_rank.values()) / state <= 0.55 else "MISSED") if strategy == "fsdp" else ""))
    mem = results[("fsdp", "async")]["memory"] / results[("ddp", "async")]["memory"]
    print(f"2. per-rank params + grads + AdamW: ddp {results[('ddp', 'async')]['memory']:.1f} MB   fsdp "
          f"{results[('fsdp', 'async')]['memory']:.1f} MB   fsdp / ddp {mem:.3f} (target <= 0.6)  "
          f"{'OK' if mem <= 0.6 else 'MISSED'}")
    sync = {}
    for strategy in ("ddp", "fsdp"):
        if args.quick:  # staging + the background write and upload, from the async run
            r = results[(strategy, "async")]
            sync[strategy] = median(r["stalls"]) + median(r["background"])
        else:
            sync[strategy] = median(results[(strategy, "sync")]["stalls"])
    how = " (estimated: stall + background write and upload; --quick runs no sync save)" if args.quick else ""
    print(f"3. synchronous save: ddp {sync['ddp']:.3f}s   fsdp {sync['fsdp']:.3f}s   fsdp / ddp "
          f"{sync['fsdp'] / sync['ddp']:.3f}{how}")
    rates = {s: results[(s, "async")]["rate"] for s in ("ddp", "fsdp")}
    print(f"4. steps/s (async checkpoints every {every}): ddp {rates['ddp']:.3f}   fsdp {rates['fsdp']:.3f}   "
          f"fsdp / ddp {rates['fsdp'] / rates['ddp']:.3f} (target on CPU >= 0.6)  "
          f"{'OK' if rates['fsdp'] / rates['ddp'] >= 0.6 else 'MISSED'}")
    for strategy in ("ddp", "fsdp"):
        stall = median(results[(strategy, "async")]["stalls"])
        ratio = stall / sync[strategy]
        print(f"5. {strategy}: loop blocked per checkpoint: async {stall:.3f}s   sync {sync[strategy]:.3f}s   "
              f"async stall / sync save {ratio:.3f} (target <= 0.02)  {'OK' if ratio <= 0.02 else 'MISSED'}")


def _final_metadata(run_uri: str) -> dict:
    from storage.listing import latest_complete
    from storage.location import join, resolve

    entry = latest_complete(resolve(run_uri))
    with entry.loc.fs.open_input_stream(join(entry.loc.path, "metadata.json")) as f:
        return json.loads(f.read())


if __name__ == "__main__":
    main()
