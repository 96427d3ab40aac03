"""``dfine-serve bench --wrk``: drive the service with wrk, a C client whose own cost stays small
beside the server's, and report req/s and the server's CPU per request: in all, and per thread,
summed over the service's process and every process descended from it (with FRONTENDS=N the
service is a supervisor with children).

Two cores cannot show scaling across sixteen, but the threads can: one host carries about
min(cores / CPU per request, 1 / the busiest thread's CPU per request), because one thread's
work (an event loop's, say) does not spread over cores. For a bigger host the busiest thread
counted is the busiest one alone in its role: a pool (decode_0, decode_1, ...) is taken to grow
with the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.bench.cli import _server, _service_command, free_port
from app.bench.images import synthetic_jpegs
from app.bench.load import fetch
from app.bench.preprocess_cost import preprocess_ms, settings_for
from app.bench.stats import metric_value
from app.config import Settings

REQUEST_KINDS = ("tiny", "photo", "multipart")
TINY_WH = (64, 48)  # decoding it costs ~0.05 ms: the rest is the request path and the resize
BOUNDARY = "dfine-bench-wrk-7f3a9c"
RESULT_MARK = "DFINE_WRK_RESULT"
# What the Lua script's done() prints after RESULT_MARK, in this order.
RESULT_FIELDS = ("requests", "duration_us", "non_2xx", "connect", "read", "write", "timeout",
                 "p50_us", "p90_us", "p99_us", "max_us")
# wrk's per-request timeout: far above any closed-loop latency here (its 2 s default would
# count a real model's slow answers at c=64 on a small machine as timeouts, not requests).
REQUEST_TIMEOUT_S = 60
BIG_HOST_CORES = 16
PROC = Path("/proc")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
MAIN_THREAD = "main"  # a process's first thread (tid == pid): the service's event loop
EXITED_THREADS = "(threads that exited)"
PYTHON_COMM = re.compile(r"^(python[\d.]*|dfine-serve)$")
NUMBERED = re.compile(r"^(.*?)\d+$")
INSTALL_HINT = "apt-get install wrk (`make tools` installs it)"


# --- what is sent -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestKind:
    name: str
    body: bytes
    content_type: str


def multipart_body(image: bytes, boundary: str = BOUNDARY, field_name: str = "image",
                   filename: str = "photo.jpg") -> bytes:
    """``image`` as the one part of a multipart/form-data body, as ``curl -F image=@f`` sends."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n').encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode()


def request_kinds(names: list[str], width: int, height: int) -> list[RequestKind]:
    """The bodies for ``names``: tiny (64x48), photo (the bench's synthetic JPEG) and
    multipart (the photo as the part ``image``)."""
    photo = synthetic_jpegs(1, width, height)[0]
    made = {
        "tiny": RequestKind("tiny", synthetic_jpegs(1, *TINY_WH)[0], "image/jpeg"),
        "photo": RequestKind("photo", photo, "image/jpeg"),
        "multipart": RequestKind("multipart", multipart_body(photo),
                                 f"multipart/form-data; boundary={BOUNDARY}"),
    }
    return [made[name] for name in names]


def parse_kinds(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(REQUEST_KINDS))
    if unknown or not names:
        raise ValueError(f"--wrk-requests: unknown {unknown or names}; "
                         f"choose from {', '.join(REQUEST_KINDS)}")
    return list(dict.fromkeys(names))


def lua_string(text: str) -> str:
    """A Lua string literal. Bytes outside a safe set are written as decimal escapes, the one
    form every Lua (wrk's LuaJIT included) reads."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_./:;=,+*()")
    return '"' + "".join(chr(b) if chr(b) in safe else f"\\{b:03d}"
                         for b in text.encode()) + '"'


def lua_script(body_path: Path, content_type: str, headers: Mapping[str, str]) -> str:
    """A wrk script: POST the bytes of ``body_path``; at the end print one line of counts and
    latency percentiles (exact integers, where wrk's text rounds and scales its units)."""
    extra = "".join(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}\n"
                    for k, v in headers.items())
    formats = " ".join(["%d"] * len(RESULT_FIELDS))
    return f"""-- written by dfine-serve bench --wrk
local file = assert(io.open({lua_string(str(body_path))}, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = {lua_string(content_type)}
{extra}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("{RESULT_MARK} {formats}\\n", summary.requests, summary.duration,
    e.status, e.connect, e.read, e.write, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max))
end
"""


# --- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    requests: int  # responses received, whatever their status
    duration_s: float
    non_2xx: int  # responses with a status of 400 or more (wrk's count)
    socket_errors: dict[str, int]  # connect, read, write, timeout: only those that happened
    latency_ms: dict[str, float]  # p50, p90, p99, max, over every response

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx


def parse_wrk_output(stdout: str) -> WrkRun:
    """The counts the script's done() printed; ValueError when wrk printed none."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK + " "):
            values = dict(zip(RESULT_FIELDS, (int(float(v)) for v in line.split()[1:]),
                              strict=True))
            break
    else:
        raise ValueError(f"wrk printed no {RESULT_MARK} line: {stdout[-1000:]!r}")
    errors = {k: values[k] for k in ("connect", "read", "write", "timeout") if values[k]}
    latency = {p: round(values[f"{p}_us"] / 1000, 2) for p in ("p50", "p90", "p99", "max")}
    return WrkRun(values["requests"], values["duration_us"] / 1e6, values["non_2xx"], errors,
                  latency)


def wrk_command(wrk: str, url: str, script: Path, connections: int, threads: int,
                duration_s: int) -> list[str]:
    """wrk reads whole seconds only."""
    return [wrk, f"-t{max(1, min(threads, connections))}", f"-c{connections}",
            f"-d{max(1, duration_s)}s", "--timeout", f"{REQUEST_TIMEOUT_S}s", "-s", str(script),
            url]


def run_wrk(command: list[str], duration_s: int) -> tuple[WrkRun, float]:
    """One wrk run, and the CPU seconds wrk itself used (the client's share of the cores)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=duration_s + REQUEST_TIMEOUT_S + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr[-1000:]}")
    client_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return parse_wrk_output(done.stdout), client_cpu_s


def find_wrk() -> str:
    found = shutil.which("wrk") or ("/usr/bin/wrk" if os.access("/usr/bin/wrk", os.X_OK)
                                    else None)
    if found is None:
        raise SystemExit(f"dfine-serve bench --wrk: wrk is not installed: {INSTALL_HINT}")
    return found


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "unknown"


# --- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskStat:
    comm: str
    ppid: int
    cpu_ticks: int  # utime + stime


def parse_stat(text: str) -> TaskStat:
    """A /proc/<pid>[/task/<tid>]/stat line. comm may hold spaces and parentheses: it runs
    from the first '(' to the last ')'."""
    head, _, tail = text.rpartition(")")
    fields = tail.split()  # fields[0] is field 3 (state): field n is fields[n - 3]
    return TaskStat(head.partition("(")[2], int(fields[1]), int(fields[11]) + int(fields[12]))


def read_stat(path: Path) -> TaskStat | None:
    """None when the task has gone."""
    try:
        return parse_stat(path.read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def parents_now(proc: Path = PROC) -> dict[int, int]:
    """Every process's parent, from /proc/*/stat."""
    parents = {}
    for entry in proc.iterdir():
        if entry.name.isdigit() and (stat := read_stat(entry / "stat")) is not None:
            parents[int(entry.name)] = stat.ppid
    return parents


def process_tree(root: int, parents: Mapping[int, int]) -> list[int]:
    """``root`` and every process descended from it, root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    order, pending = [], [root]
    while pending:
        pid = pending.pop()
        order.append(pid)
        pending.extend(sorted(children.get(pid, []), reverse=True))
    return order


def process_role(comm: str, cmdline: str, is_root: bool) -> str:
    """What a process is, as far as its name and command line tell: a process that names
    itself (anything but python or dfine-serve) goes by its name."""
    if "resource_tracker" in cmdline:
        return "resource-tracker"
    if not PYTHON_COMM.match(comm):
        return comm
    if "multiprocessing" in cmdline:
        return "worker"
    return "service" if is_root else "child"


def thread_role(tid: int, pid: int, comm: str, process_comm: str) -> str:
    """A thread's group within its process: main; its name with a trailing number made '*'
    (decode_3 -> decode_*), so that a pool sums up; or, for a thread that never named itself
    (it keeps the name the process had when it started it: Python 3.11 names no OS threads),
    its own tid."""
    if tid == pid:
        return MAIN_THREAD
    if comm == process_comm or PYTHON_COMM.match(comm):
        return f"tid {tid}"
    numbered = NUMBERED.match(comm)
    return f"{numbered.group(1)}*" if numbered else comm


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    label: str  # role and pid: "service 1234"
    comm: str
    cpu_ticks: int  # every thread's, those that exited included
    threads: dict[int, TaskStat]  # by tid


def read_process(pid: int, is_root: bool, proc: Path = PROC) -> ProcessCpu | None:
    base = proc / str(pid)
    stat = read_stat(base / "stat")
    try:
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        tids = [int(t.name) for t in (base / "task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return None
    if stat is None:
        return None
    threads = {tid: s for tid in tids if (s := read_stat(base / "task" / str(tid) / "stat"))}
    role = process_role(stat.comm, cmdline, is_root)
    return ProcessCpu(pid, f"{role} {pid}", stat.comm, stat.cpu_ticks, threads)


Snapshot = dict[int, ProcessCpu]


def snapshot(root: int, proc: Path = PROC) -> Snapshot:
    """CPU so far of ``root``, every process descended from it, and each of their threads."""
    found = {}
    for pid in process_tree(root, parents_now(proc)):
        if (process := read_process(pid, pid == root, proc)) is not None:
            found[pid] = process
    if root not in found:
        raise RuntimeError(f"no process {root} to measure (has the service exited?)")
    return found


@dataclass(frozen=True)
class ThreadUse:
    process: str  # "service 1234"
    tid: int  # 0 for what threads that exited during the run used
    comm: str
    role: str
    cpu_s: float


def cpu_used(before: Snapshot, after: Snapshot, tick_s: float = TICK_S) -> list[ThreadUse]:
    """Each thread's CPU between two snapshots. A thread or process born in between counts
    from zero; what threads that exited in between used shows as the process's own stat
    beyond its live threads (one row per process). A process that exited in between is lost:
    see ``processes_gone``."""
    uses = []
    for pid, now in after.items():
        then = before.get(pid)
        process_delta = now.cpu_ticks - (then.cpu_ticks if then else 0)
        threads_delta = 0
        for tid, stat in now.threads.items():
            earlier = then.threads.get(tid) if then else None
            delta = stat.cpu_ticks - (earlier.cpu_ticks if earlier else 0)
            threads_delta += delta
            uses.append(ThreadUse(now.label, tid, stat.comm,
                                  thread_role(tid, pid, stat.comm, now.comm), delta * tick_s))
        if process_delta > threads_delta:
            uses.append(ThreadUse(now.label, 0, "", EXITED_THREADS,
                                  (process_delta - threads_delta) * tick_s))
    return uses


def processes_gone(before: Snapshot, after: Snapshot) -> list[str]:
    return [before[pid].label for pid in sorted(set(before) - set(after))]


# --- one run's figures --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadGroup:
    process: str
    role: str
    threads: int
    cpu_ms_per_request: float
    share_pct: float


def group_threads(uses: list[ThreadUse], ok: int) -> list[ThreadGroup]:
    """CPU per successful request by process and thread role, the costliest first."""
    totals: dict[tuple[str, str], list[ThreadUse]] = {}
    for use in uses:
        totals.setdefault((use.process, use.role), []).append(use)
    whole = sum(use.cpu_s for use in uses) or 1.0
    groups = []
    for (process, role), members in totals.items():
        cpu_s = sum(use.cpu_s for use in members)
        live = sum(1 for use in members if use.tid)  # the exited threads' row is no thread
        groups.append(ThreadGroup(process, role, live, round(cpu_s / max(ok, 1) * 1000, 3),
                                  round(cpu_s / whole * 100, 1)))
    return sorted(groups, key=lambda g: (-g.cpu_ms_per_request, g.process, g.role))


def busiest_thread(uses: list[ThreadUse]) -> ThreadUse | None:
    """The one thread that used the most CPU (not a group, not the threads that exited)."""
    live = [use for use in uses if use.tid]
    return max(live, key=lambda use: use.cpu_s) if live else None


def lone_threads(uses: list[ThreadUse]) -> list[ThreadUse]:
    """The threads alone in their role in their process (an event loop, an engine thread, a
    thread that never named itself): work a bigger host cannot spread. Two or more threads of
    one name are a pool, taken to grow with the cores, as DECODE_WORKERS' auto does."""
    members = Counter((use.process, use.role) for use in uses if use.tid)
    return [use for use in uses if use.tid and members[(use.process, use.role)] == 1]


def thread_label(use: ThreadUse) -> str:
    """main, tid N (unnamed), or the thread's own name and tid."""
    if use.role == MAIN_THREAD or use.role.startswith("tid "):
        return use.role
    return f"{use.comm} (tid {use.tid})"


def ceiling_rps(total_ms: float, busiest_ms: float, cores: int) -> float | None:
    """What one host of ``cores`` carries at most: min(cores / CPU per request, 1 / the busiest
    thread's CPU per request); None without a CPU figure."""
    if total_ms <= 0:
        return None
    bounds = [cores * 1000 / total_ms] + ([1000 / busiest_ms] if busiest_ms > 0 else [])
    return round(min(bounds), 1)


def mean_batch_size(before: str | None, after: str | None) -> float | None:
    """Images per engine batch between two /metrics texts."""
    if before is None or after is None:
        return None
    images = (metric_value(after, "dfine_images_total")
              - metric_value(before, "dfine_images_total"))
    batches = (metric_value(after, "dfine_batch_size_count")
               - metric_value(before, "dfine_batch_size_count"))
    return round(images / batches, 2) if batches else None


@dataclass
class WrkResult:
    target: str
    request: str
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float  # successful requests per second
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    avg_batch_size: float | None
    cpu_ms_per_request: float | None  # the service's, every process and thread of it
    busiest_thread: dict[str, Any] | None  # process, thread, role, tid, comm, ms/request
    busiest_lone_thread: dict[str, Any] | None  # the same, of lone_threads(): serial work
    # By host: "this host (N cores)", bound by the busiest thread of all, and "16 cores",
    # bound by the busiest lone thread (the pools grow with the cores there).
    ceiling_rps: dict[str, float | None]
    client_cpu_ms_per_request: float | None  # wrk's own, for how much of the cores it took
    processes: list[str]
    processes_gone: list[str]
    threads: list[ThreadGroup]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_run(target: str, request: str, concurrency: int, run: WrkRun,
                  uses: list[ThreadUse], gone: list[str], client_cpu_s: float,
                  batch_size: float | None, cores: int) -> WrkResult:
    ok = run.ok
    per_request = 1000 / ok if ok else 0.0
    total_ms = round(sum(use.cpu_s for use in uses) * per_request, 3) if ok else None
    busiest, lone = busiest_thread(uses), busiest_thread(lone_threads(uses))
    busiest_ms = round(busiest.cpu_s * per_request, 3) if busiest else 0.0
    lone_ms = round(lone.cpu_s * per_request, 3) if lone else 0.0
    return WrkResult(
        target=target, request=request, concurrency=concurrency,
        duration_s=round(run.duration_s, 3), requests=run.requests, ok=ok,
        throughput_rps=round(ok / run.duration_s, 1) if run.duration_s else 0.0,
        non_2xx=run.non_2xx, socket_errors=run.socket_errors, latency_ms=run.latency_ms,
        avg_batch_size=batch_size, cpu_ms_per_request=total_ms,
        busiest_thread=_thread_figures(busiest, busiest_ms),
        busiest_lone_thread=_thread_figures(lone, lone_ms),
        ceiling_rps={
            f"this host ({cores} cores)": ceiling_rps(total_ms or 0.0, busiest_ms, cores),
            f"{BIG_HOST_CORES} cores": ceiling_rps(total_ms or 0.0, lone_ms, BIG_HOST_CORES)},
        client_cpu_ms_per_request=round(client_cpu_s * per_request, 3) if ok else None,
        processes=sorted({use.process for use in uses}), processes_gone=gone,
        threads=group_threads(uses, ok))


def _thread_figures(use: ThreadUse | None, cpu_ms_per_request: float) -> dict[str, Any] | None:
    if use is None:
        return None
    return {"process": use.process, "thread": thread_label(use), "role": use.role,
            "tid": use.tid, "comm": use.comm, "cpu_ms_per_request": cpu_ms_per_request}


def median_result(runs: list[WrkResult]) -> WrkResult:
    """The run with the median req/s (the lower middle one for an even count), its siblings'
    req/s kept in ``extra``, as the rest of the bench does."""
    ranked = sorted(runs, key=lambda r: r.throughput_rps)
    chosen = ranked[(len(ranked) - 1) // 2]
    if len(runs) > 1:
        chosen.extra = {**chosen.extra, "repeats_rps": [r.throughput_rps for r in runs]}
    return chosen


# --- tables ---------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def summary_table(results: list[WrkResult]) -> str:
    lines = ["| target | request | load | req/s | p50 ms | p99 ms | non-2xx | socket errors | "
             "avg batch | CPU ms/req | busiest thread, ms/req | busiest lone thread, ms/req | "
             f"ceiling here req/s | ceiling {BIG_HOST_CORES} cores req/s | wrk CPU ms/req |",
             "|---" * 15 + "|"]
    for r in results:
        here, big = r.ceiling_rps.values()
        lines.append(
            f"| {r.target} | {r.request} | c={r.concurrency} | {r.throughput_rps} | "
            f"{r.latency_ms['p50']} | {r.latency_ms['p99']} | {r.non_2xx} | "
            f"{json.dumps(r.socket_errors) if r.socket_errors else '-'} | "
            f"{_cell(r.avg_batch_size)} | {_cell(r.cpu_ms_per_request)} | "
            f"{_thread_cell(r.busiest_thread)} | {_thread_cell(r.busiest_lone_thread)} | "
            f"{_cell(here)} | {_cell(big)} | {_cell(r.client_cpu_ms_per_request)} |")
    return "\n".join(lines)


def _thread_cell(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "-"
    return (f"{figures['thread']} of {figures['process']}: "
            f"{figures['cpu_ms_per_request']}")


def threads_table(results: list[WrkResult]) -> str:
    """Every thread group that used CPU, per run."""
    lines = ["| target | request | load | process | thread | threads | CPU ms/req | share % |",
             "|---" * 8 + "|"]
    for r in results:
        for g in r.threads:
            if g.cpu_ms_per_request > 0:
                lines.append(f"| {r.target} | {r.request} | c={r.concurrency} | {g.process} | "
                             f"{g.role} | {g.threads} | {g.cpu_ms_per_request} | "
                             f"{g.share_pct} |")
    return "\n".join(lines)


def preprocess_table(results: list[WrkResult]) -> str:
    """Each run's CPU per request beside what decoding and preprocessing its image costs in
    one thread of this process: the rest is the front end's own (HTTP, hand-offs, answer)."""
    lines = ["| target | request | load | CPU ms/req | decode + preprocess in-process ms | "
             "the rest ms |", "|---" * 6 + "|"]
    for r in results:
        own = r.extra.get("preprocess_ms")
        rest = (round(r.cpu_ms_per_request - own, 3)
                if own is not None and r.cpu_ms_per_request is not None else None)
        lines.append(f"| {r.target} | {r.request} | c={r.concurrency} | "
                     f"{_cell(r.cpu_ms_per_request)} | {_cell(own)} | {_cell(rest)} |")
    return "\n".join(lines)


# --- targets and the run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int
    env: dict[str, str]


def environment_name(name: str, settings: Collection[str]) -> str:
    """A setting's name gets its DFINE_ prefix (PREPROCESS -> DFINE_PREPROCESS); any other
    name passes as written."""
    return f"DFINE_{name.upper()}" if name.lower() in settings else name


def parse_compare(spec: str, settings: Collection[str]) -> dict[str, str]:
    """One --compare value, 'NAME=VALUE NAME=VALUE', as the service's extra environment."""
    env = {}
    for item in shlex.split(spec):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--compare: {item!r} is not NAME=VALUE")
        env[environment_name(name, settings)] = value
    return env


def _unknown_names(env: Mapping[str, str], settings: Collection[str]) -> list[str]:
    return [n for n in env if not n.startswith("DFINE_") and n.lower() not in settings]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", name).strip("_") or "defaults"


def _started_targets(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Target]:
    """The services to measure: the one at --url (its PID from --pid), or one the bench
    starts for each --compare configuration (one at the defaults without any)."""
    if args.url:
        if args.pid is None:
            raise SystemExit("dfine-serve bench --wrk: --url needs --pid, the service's PID: "
                             "its CPU is read from /proc")
        if args.compare:
            raise SystemExit("dfine-serve bench --wrk: --compare starts its own services; "
                             "leave out --url")
        return [Target("service", args.url.rstrip("/"), args.pid, {})]
    settings = set(Settings.model_fields)
    flags = [*shlex.split(args.service_args), *(["--instant-engine"] if args.front_end else [])]
    targets = []
    for index, spec in enumerate(args.compare or [""]):
        env = parse_compare(spec, settings)
        for unknown in _unknown_names(env, settings):
            print(f"note: {unknown} is not one of the service's settings; passed to it as is",
                  file=sys.stderr)
        name = spec.strip() or ("front-end" if args.front_end else "service")
        port = free_port()
        started = stack.enter_context(_server(
            _service_command(args, port, *flags), port, "/readyz", name,
            args.out / f"wrk-{index}-{_slug(name)}.log", env={**os.environ, **env}))
        assert started.pid is not None
        targets.append(Target(name, started.url, started.pid, env))
    return targets


def _metrics(url: str) -> str | None:
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        return asyncio.run(fetch(url + "/metrics")).decode()
    return None


def _engine(url: str) -> Any:
    """How the target runs (/model's engine section), for the report."""
    with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError):
        return json.loads(asyncio.run(fetch(url + "/model")))["engine"]
    return None


@dataclass(frozen=True)
class Plan:
    wrk: str
    threads: int
    duration_s: int
    warmup_s: int
    cores: int


def measure(target: Target, kind: str, script: Path, concurrency: int, plan: Plan
            ) -> WrkResult:
    """Warm up (not counted), then one measured wrk run with /metrics and /proc read around
    it (/metrics outside the /proc window, so that reading it is not counted)."""
    url = target.url + "/detect"
    if plan.warmup_s > 0:
        run_wrk(wrk_command(plan.wrk, url, script, concurrency, plan.threads, plan.warmup_s),
                plan.warmup_s)
    metrics_before = _metrics(target.url)
    cpu_before = snapshot(target.pid)
    run, client_cpu_s = run_wrk(
        wrk_command(plan.wrk, url, script, concurrency, plan.threads, plan.duration_s),
        plan.duration_s)
    cpu_after = snapshot(target.pid)
    metrics_after = _metrics(target.url)
    return summarize_run(target.name, kind, concurrency, run, cpu_used(cpu_before, cpu_after),
                         processes_gone(cpu_before, cpu_after), client_cpu_s,
                         mean_batch_size(metrics_before, metrics_after), plan.cores)


def _write_scripts(kinds: list[RequestKind], folder: Path, headers: Mapping[str, str]
                   ) -> dict[str, Path]:
    scripts = {}
    for kind in kinds:
        body = folder / f"{kind.name}.body"
        body.write_bytes(kind.body)
        scripts[kind.name] = folder / f"{kind.name}.lua"
        scripts[kind.name].write_text(lua_script(body, kind.content_type, headers))
    return scripts


def run_rounds(targets: list[Target], scripts: dict[str, Path], concurrencies: list[int],
               repeat: int, plan: Plan) -> list[WrkResult]:
    """Each concurrency in turn; within it, ``repeat`` rounds of every request kind against
    every target, interleaved so that a noisy machine drifts all of them alike; the median
    run of each."""
    results: list[WrkResult] = []
    for concurrency in concurrencies:
        runs: dict[tuple[str, str], list[WrkResult]] = {}
        for round_ in range(1, repeat + 1):
            for kind, script in scripts.items():
                for target in targets:
                    label = f"{target.name} {kind} c={concurrency} ({round_}/{repeat})"
                    print(f"{label}: running", file=sys.stderr, flush=True)
                    result = measure(target, kind, script, concurrency, plan)
                    print(f"{label}: {result.throughput_rps} req/s, "
                          f"{result.cpu_ms_per_request} ms CPU/req", file=sys.stderr,
                          flush=True)
                    runs.setdefault((target.name, kind), []).append(result)
        results.extend(median_result(r) for r in runs.values())
    return results


def _report(args: argparse.Namespace, plan: Plan, targets: list[Target],
            engines: dict[str, Any], results: list[WrkResult]) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "wrk", "wrk": wrk_version(plan.wrk),
        "machine": {"cpus": plan.cores, "platform": platform.platform(),
                    "python": platform.python_version()},
        "model": str(args.model), "service_args": args.service_args,
        "front_end": bool(args.front_end), "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s, "repeat": args.repeat, "wrk_threads": plan.threads,
        "targets": {t.name: {"env": t.env, "engine": engines.get(t.name)} for t in targets},
        "results": [r.as_dict() for r in results],
    }


def _plan(args: argparse.Namespace) -> Plan:
    cores = len(os.sched_getaffinity(0))
    threads = args.wrk_threads or max(1, min(4, cores // 4))
    if args.duration_s < 1 or args.wrk_warmup_s < 0:
        raise SystemExit("dfine-serve bench --wrk: --duration-s must be at least 1 and "
                         "--wrk-warmup-s at least 0 (wrk counts whole seconds)")
    return Plan(find_wrk(), threads, round(args.duration_s), round(args.wrk_warmup_s), cores)


def main(args: argparse.Namespace) -> None:
    """``dfine-serve bench --wrk``, its arguments parsed by app.bench.cli."""
    plan = _plan(args)
    try:
        names = parse_kinds(args.wrk_requests)
    except ValueError as exc:
        raise SystemExit(f"dfine-serve bench: {exc}") from None
    concurrencies = [int(v) for v in args.concurrency.split(",") if v]
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dfine-wrk-")))
        scripts = _write_scripts(request_kinds(names, args.width, args.height), folder, headers)
        targets = _started_targets(args, stack)
        engines = {t.name: _engine(t.url) for t in targets}
        results = run_rounds(targets, scripts, concurrencies, args.repeat, plan)
    bodies = {k.name: k.body for k in request_kinds(["tiny", "photo"], args.width, args.height)}
    for result in results:  # multipart's image is the photo's
        target = next(t for t in targets if t.name == result.target)
        body = bodies["photo" if result.request == "multipart" else result.request]
        result.extra["preprocess_ms"] = preprocess_ms(settings_for(args.model, target.env),
                                                      body)
    report = _report(args, plan, targets, engines, results)
    (args.out / "wrk.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(results))
    print()
    print(threads_table(results))
    print()
    print(preprocess_table(results))
    print(f"\nCPU ms/req: every process and thread of the service, per successful request "
          f"(/proc). Ceiling: min(cores / CPU ms/req, 1 / the busiest thread's ms/req); for "
          f"{BIG_HOST_CORES} cores the busiest lone thread's (a pool of threads of one name "
          f"is taken to grow with the cores). wrote {args.out / 'wrk.json'}")
