"""A real one-node SLURM for the tests: Debian's slurm-wlm and munge (installed with apt-get when missing, as
root: about 7 s), started from a generated slurm.conf in a temp folder, stopped afterwards.

The config: this host as the only compute node, with 8 CPUs declared (``SlurmdParameters=config_overrides``: the
container has 2 cores, and several 2-task test jobs run side by side; stalled ranks sleep), ``proctrack/linuxproc``
and ``task/none`` (no cgroups here), ``auth/munge`` with a munged of our own (own key and socket), free ports
instead of the default 6817/6818, all state under the temp folder. A second partition ``gpu`` of 4 nodes with
8 GPUs each exists only on paper (no slurmd; IDLE, and never pinged: ``SlurmdTimeout=0``; measured: a DOWN
node makes ``--test-only`` answer "Requested node configuration is not available" for any request): ``sbatch
--test-only`` checks a 4 x 8 GPU script against it; nothing is ever submitted there for real. Job records stay
10 minutes after the end (``MinJobAge``) so tests read them with ``scontrol show job``; there is no accounting
daemon (no ``sacct``).

What does not run here: GPU jobs (no GPU), cgroup-based limits (no cgroups in the container), PMIx (the slurmd
log says so once; ``MpiDefault=none``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("sbatch", "srun", "scontrol", "squeue", "slurmctld", "slurmd", "munged")
_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def ensure_installed() -> str | None:
    """Install slurm-wlm and munge when a command is missing. Returns why SLURM cannot run here (not root, no
    apt-get: the test is skipped), None when it can; a failed install as root raises (in CI that is a failure)."""
    if all(_which(d) for d in DAEMONS):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root"
    if not _which("apt-get"):
        return "SLURM is not installed and this system has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:  # package lists missing on a fresh box
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        raise RuntimeError(f"apt-get installed slurm-wlm and munge, but {', '.join(missing)} is still missing")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """slurmctld + slurmd + munged under ``root`` (a temp folder). ``env``: the environment for SLURM's client
    commands (``SLURM_CONF``); jobs inherit it from the submitting environment."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[int] = []

    # ---- daemons ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool", self.root / "log"):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                        f"--seed-file={munge / 'munged.seed'}"], check=True, capture_output=True)
        self._pids.append(int((munge / "munged.pid").read_text()))
        ctld_port, d_port = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=fastssltest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ReturnToService=2
SlurmdTimeout=0
KillWait=30
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
NodeName=paper-gpu[1-4] NodeAddr=127.0.0.2 CPUs=64 RealMemory=500000 Gres=gpu:8 State=IDLE
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=paper-gpu[1-4] MaxTime=INFINITE State=UP
""")
        for daemon, pidfile in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([_which(daemon), "-f", str(self.conf)], check=True, capture_output=True, env=self.env)
            self._pids.append(int(self._wait_for_file(self.root / pidfile, 20).read_text()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.scontrol("show", "node", "-o", self.host, check=False)
            if "State=IDLE" in node:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the local slurmd did not come up in {timeout} s:\n{self.logs()}")

    @staticmethod
    def _wait_for_file(path: Path, timeout: float) -> Path:
        deadline = time.monotonic() + timeout
        while not path.is_file() or not path.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not appear in {timeout} s")
            time.sleep(0.1)
        return path

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons we started (by their pids), and wait for them."""
        subprocess.run([_which("scancel") or "scancel", "--user=root"], env=self.env, capture_output=True)
        self.scontrol("shutdown", check=False)  # slurmctld and slurmd
        deadline = time.monotonic() + 10
        for pid in reversed(self._pids):  # munged first: it does not hear scontrol
            if _alive(pid) and pid == self._pids[0]:
                os.kill(pid, signal.SIGTERM)
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    # ---- client commands ------------------------------------------------------------------------------
    def scontrol(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([_which("scontrol"), *args], env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def job(self, jid: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict: JobState, Restarts, ExitCode, Reason, ..."""
        text = self.scontrol("show", "job", "-o", jid)
        return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)

    def release_if_requeued(self, jid: str) -> bool:
        """A requeued job waits about 2 minutes (its EligibleTime); start it now. True if it was waiting."""
        rec = self.job(jid)
        if rec.get("JobState") == "PENDING" and int(rec.get("Restarts", 0)) > 0:
            self.scontrol("update", f"JobId={jid}", "StartTime=now", check=False)
            return True
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent, which is not us) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
