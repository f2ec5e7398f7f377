"""``edgeft train --num-processes N``: start N training processes on this machine through torchrun
(``python -m torch.distributed.run``), each running the same ``edgeft train`` command as one rank.
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

from edgeft.core.errors import EdgeftError

# torchrun's own log lines (glog style: "W1130 13:04:55.615000 31286 torch/distributed/...").
_LAUNCHER_LOG = re.compile(r"^[WEIF]\d{4} \d\d:\d\d:\d\d|^\[[WEI] ")


def torchrun_command(processes: int, config_file: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The torchrun command line that runs ``edgeft train --config config_file`` as ``processes`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "edgeft", "train", "--config", str(config_file)]
    return cmd + ["--resume"] * resume + ["--overwrite"] * overwrite


def worker_env(processes: int) -> dict[str, str]:
    """The environment of the ranks: CPU threads split between them unless the user chose."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def launch_processes(values: dict[str, Any], processes: int, *, resume: bool, overwrite: bool) -> None:
    """Run the training options ``values`` (flags and YAML, resolved) as ``processes`` ranks; returns
    when every rank has finished, or raises one error line if any failed (the rank's own is above)."""
    with tempfile.TemporaryDirectory(prefix="edgeft-launch-") as tmp:
        config_file = Path(tmp) / "train.json"  # JSON is YAML: `--config` reads it
        config_file.write_text(json.dumps({**values, "num_processes": processes}))
        cmd = torchrun_command(processes, config_file, resume=resume, overwrite=overwrite)
        proc = subprocess.Popen(cmd, env=worker_env(processes), stderr=subprocess.PIPE, text=True, bufsize=1)
        try:
            relay_rank_lines(proc.stderr, sys.stderr)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise EdgeftError("--num-processes: interrupted; continue from the last checkpoint with --resume") from None
    if rc != 0:
        raise EdgeftError(f"--num-processes {processes}: training stopped (exit code {rc}); the first error is "
                          "above; continue from the last checkpoint with --resume")


def relay_rank_lines(lines: Any, sink: Any) -> None:
    """Pass on what the ranks print, as it comes, without torchrun's own report of a failed worker
    (a traceback and a table that repeat the rank's one-line error) or its log lines."""
    in_report = False
    for line in lines:
        if line.startswith("Traceback") or line.startswith("=" * 20):
            in_report = True
        elif line.startswith("edgeft:"):
            in_report = False
        if in_report or _LAUNCHER_LOG.match(line) or "torch/distributed/elastic" in line:
            continue
        sink.write(line)
        sink.flush()
