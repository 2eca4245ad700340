"""recipes/launch/slurm/tessera.sbatch on a real Slurm: munged, slurmctld and slurmd (Debian's slurm-wlm and munge)
started here on localhost from a generated slurm.conf, one node that is this host with its real CPUs and memory.
A 2-task job trains the demo recipe; one task's rank is killed with SIGKILL (the script retries the srun step inside
the allocation), later the job is requeued with `scontrol requeue` (as on a node failure or preemption); the job must
complete with every step's loss and the exported files' bytes equal to an uninterrupted run's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from same_run import assert_same_run, metrics

REPO = Path(__file__).resolve().parents[3]
SBATCH = REPO / "recipes" / "launch" / "slurm" / "tessera.sbatch"
# The killed-rank test's recipe (tests/python/recipes/test_launch.py): LoRA with dropout, so RNG state must resume too.
COMMON = [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
          "training.eval_every=0", "metrics.log_every=1", "checkpoint.export_hf=true", "metrics.prompt=",
          "training.steps=12", "checkpoint.every=2", "model.lora.rank=4", "model.lora.dropout=0.1"]
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")

pytestmark = [
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs Debian's slurm-wlm and munge (scripts/setup.sh installs them): missing "
                       + ", ".join(t for t in TOOLS if shutil.which(t) is None)),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster runs as SlurmUser=root; needs root"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """munged, slurmctld and slurmd on this host, all files under `root`; stop() ends what start() started."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def _write_conf(self) -> None:
        r = self.root
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        name = re.match(r"NodeName=(\S+)", node).group(1)  # this host as slurmd sees it: real CPUs and memory
        (r / "spool" / f"slurmd-{name}").mkdir(parents=True)
        (r / "state").mkdir()
        (r / "slurm.conf").write_text(f"""\
ClusterName=tessera-test
SlurmctldHost={name}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
{node.split(" UpTime=")[0]} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        r = self.root
        self._write_conf()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        logs = open(r / "daemons.out", "w")
        # Foreground (-F / -D) so that stop() ends exactly these processes.
        self.procs.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={r}/munge.sock", f"--pid-file={r}/munged.pid",
             f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"], stdout=logs, stderr=logs))
        self.wait_for(lambda: (r / "munge.sock").exists(), 10, "munged's socket")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdout=logs, stderr=logs))
        self.procs.append(subprocess.Popen(["slurmd", "-D"], env=self.env, stdout=logs, stderr=logs))
        self.wait_for(lambda: self.slurm("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", 30,
                      "the node to be idle in sinfo")

    def slurm(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited with {res.returncode}: {res.stderr}\n{self.logs()}")
        return res.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, ExitCode, Restarts, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.slurm("scontrol", "show", "job", job_id)))

    def wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout_s} s for {what}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                         for f in sorted(self.root.glob("*.log")) + [self.root / "daemons.out"] if f.exists())

    def stop(self) -> None:
        if len(self.procs) == 3:  # the daemons came up: end the jobs first, so no task outlives slurmd
            self.slurm("scancel", "--full", "--user=root", check=False)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _rank_pids(out: Path) -> list[int]:
    """The job's rank processes (python -m tessera run ... output_dir=OUT), found by their command line."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if d.name.isdigit() and cmd[:3] == [sys.executable.encode(), b"-m", b"tessera"] \
                and f"output_dir={out}".encode() in cmd:
            pids.append(int(d.name))
    return pids


def test_sbatch_job_survives_a_killed_task_and_a_requeue_bit_identical(tmp_path):
    ref = subprocess.Popen([sys.executable, "-m", "tessera", "run", *COMMON, f"output_dir={tmp_path / 'ref'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # runs while Slurm works
    cluster = Cluster(tmp_path / "slurm")
    cluster.root.mkdir()
    out, job_out = tmp_path / "slurm_run", tmp_path / "job.out"
    try:
        cluster.start()
        cluster.env.update(PYTHON=sys.executable, MAX_TRIES="3")  # the script's variables; jobs inherit them
        job_id = cluster.slurm("sbatch", "--parsable", "--ntasks=2", f"--output={job_out}", f"--chdir={tmp_path}",
                               str(SBATCH), *COMMON, f"output_dir={out}").strip().split(";")[0]

        def last_step() -> int:  # the newest trained step; fails at once if the job has ended
            info = cluster.job(job_id)
            if info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
                raise AssertionError(f"job {job_id} ended early: JobState={info.get('JobState')} ExitCode="
                                     f"{info.get('ExitCode')}\n{job_out.read_text()[-3000:]}")
            return max([m["step"] for m in metrics(out) if "loss" in m] or [0])

        # Fault 1: SIGKILL of one task's rank at step >= 4; the step ends (--kill-on-bad-exit) and is retried.
        cluster.wait_for(lambda: last_step() >= 4 and len(_rank_pids(out)) == 2, 60, "step 4 of the job")
        killed = _rank_pids(out)[1]
        os.kill(killed, signal.SIGKILL)
        # Fault 2: once the retry has resumed and trained on, requeue the job (what Slurm does after a node failure
        # or a preemption with --requeue); Slurm delays a requeued job's start (BeginTime), so start it now.
        cluster.wait_for(lambda: "resumed from checkpoint" in job_out.read_text() and last_step() >= 8, 60,
                         "the retried step to reach step 8")
        cluster.slurm("scontrol", "requeue", job_id)
        cluster.wait_for(lambda: cluster.job(job_id).get("JobState") == "PENDING", 30, "the requeued job to pend")
        # Start it only once the old run's steps are gone from the node and a second has passed: slurmd refuses a
        # credential issued in the same second as the requeue revoked the old one ("Killing non-startable batch
        # JobId=1: Job credential revoked", seen once in CI when the restart came 0.3 s after the requeue).
        cluster.wait_for(lambda: "State=IDLE" in cluster.slurm("scontrol", "show", "node"), 30, "the node to be idle")
        time.sleep(2.0)
        cluster.slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        cluster.wait_for(lambda: cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING", "REQUEUED"), 90,
                         "the job to end")
        info, log = cluster.job(job_id), job_out.read_text()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
            f"{info}\n{log[-3000:]}\n{cluster.logs()}"
        # A status a restart cannot help (2: bad input) ends the job after one attempt, with that status.
        bad_out = tmp_path / "bad.out"
        bad = cluster.slurm("sbatch", "--parsable", "--ntasks=2", f"--output={bad_out}", str(SBATCH), *COMMON,
                            "data.source=/nope.jsonl", f"output_dir={tmp_path / 'bad'}").strip().split(";")[0]
        cluster.wait_for(lambda: cluster.job(bad).get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"), 60,
                         "the bad job to end")
        bad_info, bad_log = cluster.job(bad), bad_out.read_text()
        assert (bad_info["JobState"], bad_info["ExitCode"]) == ("FAILED", "2:0"), f"{bad_info}\n{bad_log[-2000:]}"
        assert "attempt 1 failed with status 2, which a restart cannot help" in bad_log, bad_log[-2000:]
        assert "attempt 2" not in bad_log and "/nope.jsonl does not exist" in bad_log, bad_log[-2000:]
    finally:
        cluster.stop()
        for pid in _rank_pids(out):  # none should be left; if one is, it is this test's
            os.kill(pid, signal.SIGKILL)
    ref_out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_out[-3000:]
    # The script's own account: attempt 1 failed restartably (137: the killed task's status, not its peer's 143),
    # attempt 2 resumed; after the requeue (SLURM_RESTART_COUNT=1) the first attempt resumed and finished.
    assert "attempt 1 failed with restartable status 137;" in log, log[-3000:]
    assert f"job {job_id} requeue 0 attempt 2/3" in log and f"job {job_id} requeue 1 attempt 1/3" in log, log[-3000:]
    assert log.count("resumed from checkpoint step") == 2 and log.rstrip().endswith("attempt 1 finished"), log[-3000:]
    ports = re.findall(r"MASTER_PORT=(\d+)", log)
    assert len(ports) == 3 and len(set(ports)) == 3, ports  # no attempt reuses an earlier one's port
    assert_same_run(tmp_path / "ref", out, killed)
    for sub in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):  # the files' bytes too
        assert (out / sub).read_bytes() == (tmp_path / "ref" / sub).read_bytes(), (sub, killed)
