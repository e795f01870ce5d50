"""Helpers shared by the benchmark scripts: timing (wall and CPU), memory, machine load,
markdown tables and a JSON file of measured numbers (what `project_hackathon.py` reads).

The machine these benchmarks run on is shared and noisy, so every script measures the
thing and its reference side by side in one process and reports their ratio next to the
absolute numbers; CPU seconds (`time.process_time`, this process only) are printed next to
wall seconds because they suffer less from other jobs on the same cores.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMVS = REPO.parent / "shared" / "data" / "smvs_dvd"
if not SMVS.exists():  # a git worktree next to the main checkout
    SMVS = Path("/work/shared/data/smvs_dvd")


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def machine_line() -> str:
    """One line for a table caption: date, load average, CPU count and model."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in load_average())
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average {load} (1/5/15 min); "
            f"{os.cpu_count()} CPUs ({cpu})")


@dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed():
    """`with timed() as t:` fills t.wall and t.cpu (this process's CPU seconds) on exit."""
    t = Timing()
    w, c = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.wall, t.cpu = time.perf_counter() - w, time.process_time() - c


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size so far of this process (or of its largest waited-for child), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


def current_rss_mib(pid: int | str = "self") -> float:
    """Current resident set size of a process, MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except OSError:
        pass
    return out


def tree_rss_mib(pid: int) -> float:
    """Summed current RSS of a process and all its descendants (loky workers), MiB."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += current_rss_mib(p)
        todo += _children(p)
    return total


def run_monitored(cmd: list[str], markers: dict[str, str] | None = None, interval: float = 0.2,
                  env: dict | None = None, cwd: Path = REPO, echo: bool = False) -> dict:
    """Runs a command, sampling the summed RSS of its process tree.

    Args:
        cmd: the command.
        markers: {phase name: substring}; when a line of the command's stderr contains the
            substring, the phase starts (phases in the order given; the first starts at once).
        interval: seconds between RSS samples.
        echo: also pass each line of the command's stderr to this process's stderr (progress
            of long runs).

    Returns:
        {"wall_s", "returncode", "peak_tree_rss_mib": {phase: MiB}, "phase_start_s": {phase: s},
         "max_rss_mib" (the peak of the largest single process of the tree, from wait4's
         rusage), "stdout", "stderr"}.
    """
    import threading

    markers = markers or {"all": ""}
    phases = list(markers)
    state = {"phase": phases[0], "starts": {phases[0]: 0.0}}
    peaks = {p: 0.0 for p in phases}
    err_lines: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read_err():
        for line in proc.stderr:
            err_lines.append(line)
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()
            i = phases.index(state["phase"])
            for later in phases[i + 1:]:
                if markers[later] and markers[later] in line:
                    state["phase"] = later
                    state["starts"][later] = time.perf_counter() - start
                    break

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    out_chunks = []
    out_reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    while True:
        # wait4 rather than Popen.poll: its rusage is this child's own peak RSS.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        rss = tree_rss_mib(proc.pid)
        peaks[state["phase"]] = max(peaks[state["phase"]], rss)
        time.sleep(interval)
    reader.join(5)
    out_reader.join(5)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "returncode": proc.returncode, "peak_tree_rss_mib": peaks,
            "phase_start_s": state["starts"], "max_rss_mib": usage.ru_maxrss / 1024.0,
            "stdout": "".join(out_chunks), "stderr": "".join(err_lines)}


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are printed as given by the caller (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """This script's command line, relative to the repository, for the tables."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def save_results(path: Path | None, section: str, values: dict) -> None:
    """Stores {section: values} in the JSON file at `path` (numbers for the projection),
    replacing what an earlier run stored for that section and keeping the other sections."""
    if path is None:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = {**values, "measured": time.strftime("%Y-%m-%d %H:%M"), "load_average": load_average()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))


def header(title: str) -> str:
    """The lines that open a script's markdown output: the command and the machine state."""
    return f"#### {title}\n\n`{command_line()}`  \n{machine_line()}\n"


def fmt(x: float, digits: int = 1) -> str:
    """A number with `digits` decimals, or '-' for None/NaN."""
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}"
