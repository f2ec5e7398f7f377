"""``edgeft train --num-processes N``: start N training processes on this machine through torchrun
(``python -m torch.distributed.run``), each running the same ``edgeft train`` command as one rank;
with ``--nnodes M --node-rank K --master-addr HOST``, this machine's N of the M x N processes of a
multi-node run (torchrun's static rendezvous on node 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeft.config import TrainConfig
from edgeft.core.errors import EdgeftError

# torchrun's own log lines (glog style: "W1130 13:04:55.615000 31286 torch/distributed/...", from C++
# "[E1130 15:18:36.664846014 socket.cpp:1028] ..."), and the C++ stack trace of a c10 error.
_LAUNCHER_LOG = re.compile(r"^\[?[WEIF]\d{4} \d\d:\d\d:\d\d|^\[[WEI] "
                           r"|^Exception raised from |^frame #\d+: |^<omitting python frames>")
# The last line of a Python traceback: "torch.distributed.DistStoreError: Timed out after ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\b.*:")


def torchrun_command(processes: int, config_file: Path, *, resume: bool, overwrite: bool,
                     rendezvous: list[str] | None = None) -> list[str]:
    """The torchrun command line that runs ``edgeft train --config config_file`` as ``processes`` ranks
    on this machine; ``rendezvous`` (``rendezvous_args``) says where they meet (default: this machine alone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ["--standalone"]),
           f"--nproc-per-node={processes}", "-m", "edgeft", "train", "--config", str(config_file)]
    return cmd + ["--resume"] * resume + ["--overwrite"] * overwrite


def rendezvous_args(cfg: TrainConfig) -> list[str]:
    """torchrun's options for where the processes meet: this machine alone, or node ``--node-rank`` of
    ``--nnodes`` at ``--master-addr:--master-port`` (static rendezvous; node 0 hosts it and waits
    ``--dist-timeout`` seconds for the others)."""
    if cfg.nnodes == 1:
        return ["--standalone"]
    return [f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}", f"--master-addr={cfg.master_addr}",
            f"--master-port={cfg.master_port}", f"--rdzv-conf=timeout={cfg.dist_timeout}"]


def worker_env(processes: int) -> dict[str, str]:
    """The environment of the ranks: CPU threads split between them unless the user chose."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def launch_processes(values: dict[str, Any], cfg: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Run the training options ``values`` (flags and YAML, resolved into ``cfg``) as ``--num-processes``
    ranks on this machine; returns when every rank has finished, or raises one error line if any
    failed (the rank's own is above)."""
    processes = cfg.num_processes
    with tempfile.TemporaryDirectory(prefix="edgeft-launch-") as tmp:
        config_file = Path(tmp) / "train.json"  # JSON is YAML: `--config` reads it
        config_file.write_text(json.dumps({**values, "num_processes": processes}))
        cmd = torchrun_command(processes, config_file, resume=resume, overwrite=overwrite,
                               rendezvous=rendezvous_args(cfg))
        proc = subprocess.Popen(cmd, env=worker_env(processes), stderr=subprocess.PIPE, text=True, bufsize=1)
        try:
            launcher_error = relay_rank_lines(proc.stderr, sys.stderr)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise EdgeftError("--num-processes: interrupted; continue from the last checkpoint with --resume") from None
    if rc != 0:
        node = f" (node {cfg.node_rank} of {cfg.nnodes})" if cfg.nnodes > 1 else ""
        if launcher_error:  # no rank said why: the processes did not start or did not meet
            hint = " (does every node run the same command and reach --master-addr:--master-port?)" if node else ""
            raise EdgeftError(f"--num-processes {processes}{node}: torchrun failed: {launcher_error[:200]}{hint}")
        raise EdgeftError(f"--num-processes {processes}{node}: training stopped (exit code {rc}); the first error "
                          "is above; continue from the last checkpoint with --resume")


def relay_rank_lines(lines: Any, sink: Any) -> str | None:
    """Pass on what the ranks print, as it comes, without torchrun's own report of a failed worker
    (a traceback and a table that repeat the rank's one-line error) or its log lines. Returns the
    last exception line of torchrun's own tracebacks when no rank printed an error (None otherwise)."""
    in_report, rank_error, launcher_error, dropped = False, False, None, False
    for line in lines:
        if line.startswith("Traceback") or line.startswith("=" * 20):
            in_report = True
        elif line.startswith("edgeft:"):
            in_report = False
            rank_error = rank_error or line.startswith("edgeft: error:")
        if in_report and _EXCEPTION_LINE.match(line):
            launcher_error = line.strip()
        dropped = (in_report or bool(_LAUNCHER_LOG.match(line)) or "torch/distributed/elastic" in line
                   or (dropped and not line.strip()))  # with the blank lines that end what was dropped
        if dropped:
            continue
        sink.write(line)
        sink.flush()
    return None if rank_error else launcher_error
