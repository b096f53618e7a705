"""A real Slurm on this one machine that presents two nodes, for tests.

munged + slurmctld + one slurmd per node (Debian's slurm-wlm and munge packages), everything in a
private folder: config, key, state, spool, logs, sockets. Each slurmd runs in its own UTS
namespace (`unshare --uts`) with its node's hostname, so that a job sees two hosts: MPI and
DeepSpeed group ranks into nodes by hostname. Ports are free ones; the daemons are started and
stopped by PID. Needs root (slurmd runs jobs as their owner) and /etc/hosts lines for the node
names, which `ensure_hosts_entries` appends if missing.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

from conftest import free_port

PACKAGES = {"munged": "munge", "mungekey": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
            "sbatch": "slurm-wlm", "squeue": "slurm-wlm", "scontrol": "slurm-wlm", "unshare": "util-linux"}


def missing_tools() -> list[str]:
    return sorted({f"{tool} ({package})" for tool, package in PACKAGES.items() if not shutil.which(tool)})


def free_port_range(count: int) -> int:
    """A port p with p .. p + count - 1 all free (slurmd ports are given as a range)."""
    for _ in range(100):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


def ensure_hosts_entries(names, hosts_file="/etc/hosts"):
    """Append '127.0.0.1 name' for each node name that does not resolve; never rewrites the file."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open(hosts_file, "rb") as f:
            ends_in_newline = f.read().endswith(b"\n") or f.tell() == 0
        with open(hosts_file, "a") as f:
            f.write("" if ends_in_newline else "\n")  # never join the file's last line
            f.write("".join(f"127.0.0.1 {name}  # soft-ds tests: local Slurm node\n" for name in missing))
    return missing


# A requeued job may start again only once its launch credentials have expired (cred_expire, 120 s
# by default) and the scheduler next looks at it (sched_interval, 60 s): both short here, so that
# the requeue tests wait seconds for a restart, not minutes. JobRequeue=1 (Slurm's default, stated)
# lets batch jobs be requeued. MaxTime=INFINITE admits any limit, one minute too, and OverTimeLimit=1
# holds the kill of a job past its limit one more minute: a one-minute job's warning (29-59 s in,
# on Slurm's 30-second clock) may land in the start-up of four ranks on a busy 2-core machine, and
# the run must still have time to take its first step and save it.
CRED_EXPIRE = 5
CONF = """\
ClusterName=softtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
TmpFS={root}/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
JobRequeue=1
SchedulerParameters=sched_interval=2
KillWait=5
NodeName={node_range} NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port}-{last_node_port}] CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node_range} Default=YES MaxTime=INFINITE OverTimeLimit=1 State=UP
"""


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` is the environment clients need (SLURM_CONF)."""

    def __init__(self, root, nodes=2, cpus_per_node=2):
        self.root = str(root)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus_per_node
        self.processes: dict[str, subprocess.Popen] = {}
        self.outputs = []
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def log(self, name) -> str:
        path = os.path.join(self.root, "log", name)
        return open(path, errors="replace").read() if os.path.exists(path) else f"({path} missing)"

    def start(self, timeout=30):
        root = self.root
        for folder in ["munge", "state", "log"] + [f"spool-{n}" for n in self.nodes] + [f"tmp-{n}" for n in self.nodes]:
            os.makedirs(os.path.join(root, folder), mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)  # munged refuses a key or socket under a folder others can write
        node_port = free_port_range(len(self.nodes))
        with open(self.conf, "w") as f:
            f.write(CONF.format(root=root, ctld_port=free_port(), node_port=node_port, cred_expire=CRED_EXPIRE,
                                last_node_port=node_port + len(self.nodes) - 1,
                                node_range=f"node[1-{len(self.nodes)}]", cpus=self.cpus))
        key = os.path.join(root, "munge", "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket",
                               f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                               f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed"])
        self._wait_for(lambda: os.path.exists(f"{root}/munge/munge.socket"), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        for node in self.nodes:
            # Own UTS namespace, own hostname: job steps on this node see `hostname` == node.
            self._spawn(f"slurmd-{node}", ["unshare", "--uts", "sh", "-c",
                                          f"hostname {node} && exec slurmd -D -N {node} -f {self.conf}"])
        self._wait_for(self._nodes_idle, timeout, "both nodes idle in sinfo")

    def _spawn(self, name, cmd):
        self.outputs.append(open(os.path.join(self.root, "log", f"{name}.stdout"), "w"))
        self.processes[name] = subprocess.Popen(cmd, stdout=self.outputs[-1], stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)

    def _nodes_idle(self):
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=30)
        states = dict(line.split() for line in result.stdout.splitlines())
        return result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, condition, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"local Slurm: {name} exited {process.returncode} while waiting for {what}\n"
                                       + self.log(f"{name}.stdout")[-2000:] + self.log(f"{name}.log")[-2000:])
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"local Slurm: timed out waiting for {what}\n" + self.log("slurmctld.log")[-3000:])

    def run(self, *cmd, env=None, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, srun, squeue, ...) against this cluster, in `env` if given."""
        env = self.env if env is None else {**env, "SLURM_CONF": self.conf}
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, **kwargs)

    def stop(self):
        """Cancel what still runs, then stop the daemons by PID, in reverse order of start."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--user=root", timeout=30)  # root: every job on this private cluster
                self._wait_for(lambda: not self.run("squeue", "-h", timeout=30).stdout.strip(), 30, "jobs to end")
            except (subprocess.TimeoutExpired, RuntimeError):
                pass  # stop the daemons regardless
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for output in self.outputs:
            output.close()
