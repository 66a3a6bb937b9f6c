"""Data-parallel extraction through Hugging Face accelerate.

``accelerate launch -m sali train …`` (or ``sali train --processes N``, which runs that launcher
on this machine) starts N copies of ``sali train``. Each copy extracts the shards whose index
``b`` satisfies ``b % N == rank`` into the one cache folder, which is keyed by the data, never
by N: an interrupted run resumes with any number of processes, and a single-process run reuses
the shards of a multi-process one (and the reverse). When every process has written its shards
(accelerate's barrier), the main process trains and writes the head; the others end.

Multi-GPU and multi-machine runs use accelerate's own flags, e.g. on two machines of 8 GPUs::

    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 16 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m sali train --base … --cache /shared/cache

(the cache folder must be shared between machines). On a machine without GPUs the processes
talk over gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class Processes:
    """This process's place in the run: ``rank`` of ``count``; `state` is accelerate's
    ``PartialState`` when launched by accelerate with more than one process, else None."""

    rank: int = 0
    count: int = 1
    state: Any = None
    device: str | None = None  # the device accelerate gives this process (cuda:LOCAL_RANK), if any

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def current(device: str) -> Processes:
    """This process's :class:`Processes`; accelerate is only imported under its launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from datetime import timedelta

    from accelerate import PartialState

    # one process may extract for much longer than another (a resumed run): wait up to a day
    state = PartialState(cpu=device == "cpu", timeout=timedelta(days=1))
    placed = str(state.device) if device != "cpu" and state.device.type != "cpu" else None
    return Processes(state.process_index, state.num_processes, state, placed)


def launch(arguments: list[str], processes: int) -> int:
    """Run ``sali <arguments>`` in `processes` processes on this machine through accelerate's
    launcher; returns its exit status."""
    import importlib.util

    from sali.errors import SaliError

    if importlib.util.find_spec("accelerate") is None:
        raise SaliError("--processes needs Hugging Face accelerate: pip install 'sali[train]'")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sali", *arguments]
    return subprocess.run(command).returncode
