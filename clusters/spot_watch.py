"""`python clusters/spot_watch.py [--grace-s 20] [--gce] -- ray start --address=HEAD:PORT ...`: start
a spot worker node's Ray so that the VM's shutdown becomes a preemption notice.

What Ray 2.60 does by itself: the raylet handles SIGTERM by unregistering at once (src/ray/raylet/
main.cc: "received SIGTERM. Existing local drain request = ..."; without a drain request the node
dies as EXPECTED_TERMINATION), and the Python workers exit on it. A spot VM's shutdown sends
SIGTERM to every process, then SIGKILL (GCE about 30 s later, AWS up to 120 s): the node vanishes
at the SIGTERM and the job loses every step since its last checkpoint. Only `ray start --block`
drains on SIGTERM, and only in its own process, while the raylet still gets the signal.

What this does:
1. It runs the `ray start` command with SIGTERM blocked. The mask is inherited by every process
   Ray starts on the node (raylet, agents, workers: checked in /proc/PID/status, SigBlk), so a
   shutdown's SIGTERM stays pending in them: the node lives until the SIGKILL.
2. It stays behind as a small daemon that does take SIGTERM (and, with --gce, watches the GCE
   metadata server's `instance/preempted`, which turns TRUE at the preemption notice). Either
   way it drains its own node through Ray's API: reason PREEMPTION, deadline now + grace_s. Ray
   Train's preemption watcher turns that into `get_preemption_info()`; the job saves and commits
   the step in progress and holds until Ray restarts it on the nodes that remain
   (trainers/preemption.py).
3. It exits when its node's raylet is gone.

Cost: a plain `ray stop` on such a node no longer stops Ray (its SIGTERM is pending too); use
`ray stop --force`, as the cluster YAMLs do. grace_s must end before the SIGKILL (GCE: 30 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted?wait_for_change=true"


def _log(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(command):
            return command[i + 1]
    return None


def start(command: list[str]) -> tuple[str, int]:
    """Run `ray start` with SIGTERM blocked; (GCS address, node manager port) of the node."""
    gcs = _flag(command, "--address")
    if gcs is None:
        raise SystemExit("spot_watch: the ray start command needs --address=HEAD:PORT (a worker node)")
    port = _flag(command, "--node-manager-port")
    if port is None:  # the node is found by it once started
        port = str(_free_port())
        command = [*command, f"--node-manager-port={port}"]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        code = subprocess.run(command).returncode
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if code:
        raise SystemExit(code)
    return gcs, int(port)


def node_id(gcs: str, port: int, timeout_s: float = 60) -> str:
    import ray._raylet

    client = ray._raylet.GcsClient(address=gcs)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for nid, info in client.get_all_node_info().items():
            if info.node_manager_port == port and info.state == 0:  # ALIVE
                return nid.hex()
        time.sleep(0.5)
    raise SystemExit(f"spot_watch: no live node with node manager port {port} at {gcs}")


def drain(gcs: str, node: str, why: str, grace_s: float) -> bool:
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + int(grace_s * 1000)
    accepted, message = ray._raylet.GcsClient(address=gcs).drain_node(
        node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), why, deadline_ms)
    return accepted


def _raylet_alive(port: int) -> bool:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_manager_port={port}".encode() in args:
            return True
    return False


def _gce_preempted(host: str, stop: threading.Event, notice) -> None:
    """Long-poll the metadata server; call notice() once it says the VM is preempted."""
    while not stop.is_set():
        try:
            request = urllib.request.Request(f"http://{host}{GCE_PREEMPTED}", headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(request, timeout=60) as r:
                if r.read().strip().upper() == b"TRUE":
                    notice("GCE preemption notice (instance/preempted)")
                    return
        except OSError:
            stop.wait(5)


def watch(gcs: str, port: int, grace_s: float, log: str, gce_host: str | None) -> None:
    node = node_id(gcs, port)
    _log(log, f"watching node {node} (node manager port {port}); a SIGTERM drains it with {grace_s:g}s to go")
    fired = threading.Event()

    def notice(why: str) -> None:
        if fired.is_set():
            return
        fired.set()
        try:
            ok = drain(gcs, node, f"spot: {why}", grace_s)
        except Exception as e:  # noqa: BLE001 - the head unreachable: nothing more to do
            _log(log, f"{why}: drain of {node} failed: {type(e).__name__}: {e}")
            return
        _log(log, f"{why}: drain of {node} {'accepted' if ok else 'refused'}, deadline in {grace_s:g}s")

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=notice, args=("SIGTERM",)).start())
    stop = threading.Event()
    if gce_host:
        threading.Thread(target=_gce_preempted, args=(gce_host, stop, notice), daemon=True).start()
    while _raylet_alive(port):
        time.sleep(1)
    stop.set()
    _log(log, f"node {node} is gone; exiting")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: spot_watch.py [--grace-s S] [--gce] [--log PATH] -- ray start --address=HEAD:PORT ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="spot_watch.py")
    p.add_argument("--grace-s", type=float, default=20.0, help="the drain's deadline after a notice")
    p.add_argument("--gce", action="store_true", help="also watch GCE's instance/preempted")
    p.add_argument("--log", default="/tmp/spot_watch.log")
    args = p.parse_args(argv[:split])
    gcs, port = start(argv[split + 1:])
    if os.fork():  # the YAML's command returns; the watcher lives on
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    gce = (os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal") if args.gce else None
    try:
        watch(gcs, port, args.grace_s, args.log, gce)
    except BaseException as e:  # noqa: BLE001 - a daemon: say why in its log
        _log(args.log, f"stopped: {type(e).__name__}: {e}")
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
