"""`clusters/local.sh up | down | status`: a Ray cluster launched by Ray's own cluster launcher
(`ray up`) on this machine, to try the `ray up` path without a cloud.

Ray's local provider starts a head node at 127.0.0.2 and, through the autoscaler, worker
nodes at 127.0.0.3 and 127.0.0.4, over SSH. The SSH is this script's own: an sshd listening on
those addresses only, on a free port, with its own config, host key and authorized key in the
cluster folder (`LOCAL_CLUSTER_DIR`, default /tmp/rtr-local-UID). Nothing in ~/.ssh or
/etc/ssh is read or changed. What a single host needs beyond cluster.yaml is in
clusters/local.yaml's comments and ../shared/research/ray-up-local.md.

`down` stops this cluster's processes by pid (`ray down` stops nothing on one host, and the
`ray stop` it runs would stop every Ray on the machine), then removes every file `ray up`
left: the cluster folder, Ray's state and config cache for this cluster name, its SSH control
folder, and the bootstrap config and key copy in the home folder when they are this cluster's.
Both commands are safe to run twice.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IPS = "127.0.0.2", ("127.0.0.3", "127.0.0.4")
SSHD = "/usr/sbin/sshd"


def folder() -> Path:
    return Path(os.environ.get("LOCAL_CLUSTER_DIR") or f"/tmp/rtr-local-{os.getuid()}").resolve()


def cluster_name(dir: Path) -> str:
    return "rtr-local-" + hashlib.sha256(str(dir).encode()).hexdigest()[:8]


def say(line: str) -> None:
    print(line, flush=True)


# --- processes ---------------------------------------------------------------------------

def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _mentions(pid: int, markers: list[str]) -> bool:
    """Whether a process names one of markers in its command line or holds a file open under
    one (Ray rewrites its agents' and workers' titles, but their logs stay open)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        if any(m in cmdline for m in markers):
            return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if any(target.startswith(m) for m in markers if m.startswith("/")):
                return True
    except OSError:
        pass
    return False


def processes(markers: list[str]) -> set[int]:
    """The processes that mention a marker, and all their descendants; never this process or
    its ancestors (a caller's working folder may be under a marker)."""
    me, spared = os.getpid(), set()
    pid = me
    while pid > 1:
        spared.add(pid)
        pid = _parent(pid)
    pids = _pids()
    found = {p for p in pids if p not in spared and _mentions(p, markers)}
    children: dict[int, list[int]] = {}
    for p in pids:
        children.setdefault(_parent(p), []).append(p)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in spared:
                found.add(child)
                todo.append(child)
    return found


def stop(pids: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after grace_s (gcs_server and raylet can ignore
    SIGTERM for longer than that)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- ports and SSH ------------------------------------------------------------------------

def free_port(*hosts: str) -> int:
    """A TCP port free on every host (all addresses when none is given)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((hosts[0] if hosts else "", 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise OSError(f"no port free on {', '.join(hosts)}")


def ensure_tools() -> None:
    """sshd and rsync, from the distribution's packages when missing (as root)."""
    if os.path.exists(SSHD) and shutil.which("rsync") and shutil.which("ssh-keygen"):
        return
    if os.getuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("error: the local cluster needs openssh-server and rsync; install them "
                         "(apt-get install openssh-server rsync) and run this again")
    say("Installing openssh-server and rsync (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server", "rsync"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


def start_sshd(dir: Path, port: int, agent_ports: list[int]) -> int:
    ssh = dir / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    for key in ("host_ed25519", "id_ed25519"):
        if not (ssh / key).exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rtr-local",
                            "-f", str(ssh / key)], check=True)
    shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    listen = "".join(f"ListenAddress {ip}:{port}\n" for ip in (HEAD_IP, *WORKER_IPS))
    # Each worker node's own address and agent port reach its commands (one template in
    # local.yaml for both nodes) through the SSH session: sshd sets them by the address it was
    # reached at.
    per_node = "".join(f"Match LocalAddress {ip}\n    SetEnv RTR_NODE_IP={ip} RTR_AGENT_PORT={agent}\n"
                       for ip, agent in zip(WORKER_IPS, agent_ports))
    (ssh / "sshd_config").write_text(
        listen +
        f"HostKey {ssh}/host_ed25519\nPidFile {ssh}/sshd.pid\n"
        f"AuthorizedKeysFile {ssh}/authorized_keys\nAllowUsers {getpass.getuser()}\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        # the keys live in a folder sshd does not own; only this user's key is in it
        "StrictModes no\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n" + per_node)
    if os.getuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    subprocess.run([SSHD, "-f", str(ssh / "sshd_config"), "-E", str(ssh / "sshd.log")], check=True)
    for _ in range(50):
        if (ssh / "sshd.pid").exists():
            return int((ssh / "sshd.pid").read_text())
        time.sleep(0.1)
    raise SystemExit(f"error: sshd did not start; see {ssh / 'sshd.log'}")


# --- up, down, status ---------------------------------------------------------------------

def render(dir: Path, ports: dict) -> Path:
    values = {"CLUSTER_NAME": cluster_name(dir), "DIR": str(dir), "REPO": str(REPO),
              "PYTHON": str(BIN / "python"), "SSH_USER": getpass.getuser(),
              **{k.upper(): str(v) for k, v in ports.items()}}
    text = string.Template((REPO / "clusters" / "local.yaml").read_text()).safe_substitute(values)
    out = dir / "cluster.yaml"
    out.write_text(text)
    return out


def ray_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               **extra)
    return env


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def up() -> int:
    dir = folder()
    state_file = dir / "cluster.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _listening(state["ports"]["dashboard_port"]) and _alive(state.get("sshd_pid", 0)):
            say(f"The local cluster in {dir} is up already")
            say(f"RAY_ADDRESS=http://127.0.0.1:{state['ports']['dashboard_port']}")
            return 0
        say(f"A local cluster in {dir} was left half up: taking it down first")
        down()
    ensure_tools()
    dir.mkdir(parents=True, exist_ok=True)
    ports = {"ssh_port": free_port(HEAD_IP, *WORKER_IPS)}
    agents = [f"worker{i}_agent_port" for i in range(len(WORKER_IPS))]
    for name in ("gcs_port", "dashboard_port", "client_port", "head_agent_port",
                 *agents, "autoscaler_metric_port", "dashboard_metric_port"):
        while True:  # distinct from those already chosen
            port = free_port()
            if port not in ports.values():
                ports[name] = port
                break
    sshd = start_sshd(dir, ports["ssh_port"], [ports[a] for a in agents])
    state_file.write_text(json.dumps({"ports": ports, "sshd_pid": sshd, "name": cluster_name(dir)}))
    say(f"sshd for the cluster on {HEAD_IP} and {', '.join(WORKER_IPS)}, port {ports['ssh_port']} (pid {sshd})")
    config = render(dir, ports)
    log = dir / "ray-up.log"
    say(f"ray up {config} (log: {log}) ...")
    started = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(config)],
                            env=ray_env(RAY_UP_enable_autoscaler_v2="0"), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0 or not _listening(ports["dashboard_port"]):
        sys.stderr.write(log.read_text()[-3000:])
        say(f"error: ray up failed (exit {rc}); the log: {log}. Taking the cluster down")
        down()
        return 1
    say(f"Head node up at {HEAD_IP} in {time.monotonic() - started:.0f} s; the autoscaler starts "
        f"the worker nodes at {', '.join(WORKER_IPS)} (`clusters/local.sh status`)")
    say(f"RAY_ADDRESS=http://127.0.0.1:{ports['dashboard_port']}")
    return 0


def leftovers(dir: Path, name: str) -> list[Path]:
    """The files `ray up` leaves outside the cluster folder for this cluster name."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    found = [Path(f"/tmp/ray/cluster-{name}.state"), Path(f"/tmp/ray/cluster-{name}.lock"),
             Path(f"/tmp/ray_ssh_{user}/{hashlib.sha256(name.encode()).hexdigest()[:10]}")]
    for cached in Path("/tmp").glob("ray-config-*"):
        try:
            if json.loads(cached.read_text()).get("cluster_name") == name:
                found.append(cached)
        except (OSError, ValueError, AttributeError):
            pass
    home_config = Path.home() / "ray_bootstrap_config.yaml"
    try:
        if f"cluster_name: {name}\n" in home_config.read_text() or \
                json.loads(home_config.read_text()).get("cluster_name") == name:
            found += [home_config, Path.home() / "ray_bootstrap_key.pem"]
    except (OSError, ValueError, AttributeError):
        pass
    return [p for p in found if p.exists()]


def markers(dir: Path, name: str, ports: dict | None) -> list[str]:
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    found = [str(dir), f"/tmp/ray_ssh_{user}/{hashlib.sha256(name.encode()).hexdigest()[:10]}"]
    if ports:  # ssh's proxy processes name only the address and port
        found += [f"tcp_pipe.py {ip} {ports['ssh_port']}" for ip in (HEAD_IP, *WORKER_IPS)]
    return found


def down() -> int:
    dir = folder()
    name = cluster_name(dir)
    state = {}
    if (dir / "cluster.json").exists():
        state = json.loads((dir / "cluster.json").read_text())
    pids = processes(markers(dir, name, state.get("ports")))
    files = leftovers(dir, name)
    if not pids and not files and not dir.exists():
        say(f"No local cluster in {dir}")
        return 0
    stop(pids)
    for path in files:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(dir, ignore_errors=True)
    say(f"Local cluster {name} down: {len(pids)} processes stopped, {dir} and {len(files)} "
        "files of `ray up` removed")
    return 0


def alive_nodes(dashboard_port: int) -> list[str]:
    """The addresses of the cluster's alive nodes, from the head's GCS."""
    p = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json", "--address",
                        f"http://127.0.0.1:{dashboard_port}", "--filter", "state=ALIVE"],
                       env=ray_env(), capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        return []
    return sorted(n["node_ip"] for n in json.loads(p.stdout))


def status() -> int:
    dir = folder()
    if not (dir / "cluster.json").exists():
        say(f"No local cluster in {dir}")
        return 1
    port = json.loads((dir / "cluster.json").read_text())["ports"]["dashboard_port"]
    nodes = alive_nodes(port)
    say(f"RAY_ADDRESS=http://127.0.0.1:{port}")
    say(f"alive nodes: {', '.join(nodes) or 'none'}")
    return 0 if nodes else 1


def head_proxy(dir: str) -> int:
    """On the head, before Ray starts: `ray up` writes the autoscaler's config to
    ~/ray_bootstrap_config.yaml (JSON) without auth.ssh_proxy_command; copy it back from the
    cluster's rendered config, so the autoscaler reaches the worker node's sshd."""
    import yaml

    proxy = yaml.safe_load((Path(dir) / "cluster.yaml").read_text())["auth"]["ssh_proxy_command"]
    path = Path.home() / "ray_bootstrap_config.yaml"
    config = json.loads(path.read_text())
    config["auth"]["ssh_proxy_command"] = proxy
    path.write_text(json.dumps(config))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["head-proxy"] and len(argv) == 2:
        return head_proxy(argv[1])
    commands = {"up": up, "down": down, "status": status}
    if len(argv) != 1 or argv[0] not in commands:
        print("usage: clusters/local.sh up | down | status", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
