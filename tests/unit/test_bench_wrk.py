"""``dfine-serve bench --wrk``'s pure parts: what wrk prints, the Lua script and bodies, /proc
parsing and deltas, the per-thread grouping and the ceiling estimate; and one snapshot of a
real process tree with a named thread."""

from __future__ import annotations

import os
import subprocess
import sys
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest

from app.bench.wrk import (
    EXITED_THREADS,
    RESULT_MARK,
    ProcessCpu,
    TaskStat,
    ThreadUse,
    WrkRun,
    busiest_thread,
    ceiling_rps,
    cpu_used,
    find_wrk,
    group_threads,
    lone_threads,
    lua_script,
    lua_string,
    mean_batch_size,
    median_result,
    multipart_body,
    parse_compare,
    parse_kinds,
    parse_stat,
    parse_wrk_output,
    process_role,
    process_tree,
    processes_gone,
    snapshot,
    summarize_run,
    thread_label,
    thread_role,
    wrk_command,
)
from tests.helpers import wait_until

WRK_STDOUT = f"""Running 10s test @ http://127.0.0.1:8000/detect
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   140.65ms    6.95ms  275.44ms   72.52%
  4520 requests in 10.00s, 2.1MB read
  Non-2xx or 3xx responses: 20
Requests/sec:    452.00
{RESULT_MARK} 4520 10001000 20 0 3 0 0 140003 150100 182379 275444
"""


def test_parse_wrk_output_reads_the_scripts_exact_counts() -> None:
    run = parse_wrk_output(WRK_STDOUT)
    assert (run.requests, run.ok, run.non_2xx) == (4520, 4500, 20)
    assert run.duration_s == pytest.approx(10.001)
    assert run.socket_errors == {"read": 3}  # only the kinds that happened
    assert run.latency_ms == {"p50": 140.0, "p90": 150.1, "p99": 182.38, "max": 275.44}


def test_parse_wrk_output_without_the_scripts_line_says_what_wrk_printed() -> None:
    with pytest.raises(ValueError, match="unable to connect"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_strings_escape_everything_but_plain_characters() -> None:
    assert lua_string("image/jpeg") == '"image/jpeg"'
    assert lua_string('a"b\\c\nd') == '"a\\034b\\092c\\010d"'
    assert lua_string("é") == '"\\195\\169"'  # UTF-8 bytes, as Lua strings hold them


def test_lua_script_posts_the_body_file_with_its_headers(tmp_path: Path) -> None:
    script = lua_script(tmp_path / "photo.body", "multipart/form-data; boundary=b",
                        {"X-API-Key": 'k"1'})
    assert f'io.open("{tmp_path}/photo.body", "rb")' in script
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "multipart/form-data; boundary=b"' in script
    assert 'wrk.headers["X-API-Key"] = "k\\0341"' in script
    assert f"{RESULT_MARK} " + " ".join(["%d"] * 11) in script


def test_multipart_body_is_one_image_part_as_curl_sends_it() -> None:
    image = b"\xff\xd8 jpeg \r\n bytes \xff\xd9"
    body = multipart_body(image, boundary="XyZ")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n" + body)
    [part] = list(message.iter_parts())
    assert part.get_param("name", header="content-disposition") == "image"
    assert part.get_content_type() == "image/jpeg"
    assert part.get_payload(decode=True) == image


def test_parse_kinds_keeps_order_drops_repeats_and_names_unknown_ones() -> None:
    assert parse_kinds("photo, tiny,photo") == ["photo", "tiny"]
    with pytest.raises(ValueError, match="huge"):
        parse_kinds("tiny,huge")


def test_wrk_command_has_no_more_threads_than_connections_and_whole_seconds() -> None:
    command = wrk_command("/usr/bin/wrk", "http://h/detect", Path("s.lua"), 2, 4, 0)
    assert command[1:4] == ["-t2", "-c2", "-d1s"]
    assert command[-3:] == ["-s", "s.lua", "http://h/detect"]


def test_without_wrk_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.bench.wrk.shutil.which", lambda name: None)
    monkeypatch.setattr("app.bench.wrk.os.access", lambda path, mode: False)
    with pytest.raises(SystemExit, match=r"apt-get install wrk \(`make tools`"):
        find_wrk()


def test_parse_stat_reads_a_comm_with_spaces_and_parentheses() -> None:
    fields = " ".join(str(n) for n in range(4, 53))  # field n holds n, from ppid on
    stat = parse_stat(f"1234 (we (ird) name) S {fields}")
    assert stat == TaskStat("we (ird) name", ppid=4, cpu_ticks=14 + 15)


def test_process_tree_is_the_root_and_every_descendant() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert process_tree(10, parents) == [10, 11, 13, 12]
    assert process_tree(99, parents) == [99]


def test_thread_roles_sum_numbered_pools_and_keep_unnamed_threads_apart() -> None:
    assert thread_role(100, 100, "python", "python") == "main"
    assert thread_role(101, 100, "python", "python") == "tid 101"  # never named
    assert thread_role(102, 100, "decode_3", "python") == "decode_*"
    assert thread_role(103, 100, "engine-12", "python") == "engine-*"
    assert thread_role(104, 100, "libuv-worker", "python") == "libuv-worker"
    assert thread_role(105, 100, "dfine-serve", "dfine-serve") == "tid 105"
    assert thread_role(106, 100, "python3", "MainThread") == "tid 106"  # main renamed later


def test_process_roles_come_from_the_name_or_the_command_line() -> None:
    assert process_role("python", "python -m app --port 1", is_root=True) == "service"
    assert process_role("python3.11", "python -m app", is_root=False) == "child"
    assert process_role("dfine-frontend", "python -m app", is_root=False) == "dfine-frontend"
    spawned = "python -c from multiprocessing.spawn import spawn_main; spawn_main(fd=7)"
    assert process_role("python", spawned, is_root=False) == "worker"
    tracker = "python -c from multiprocessing.resource_tracker import main;main(6)"
    assert process_role("python", tracker, is_root=False) == "resource-tracker"


def _process(pid: int, label: str, ticks: int, threads: dict[int, tuple[str, int]]
             ) -> ProcessCpu:
    return ProcessCpu(pid, label, "python", ticks,
                      {tid: TaskStat(comm, pid, t) for tid, (comm, t) in threads.items()})


def test_cpu_used_counts_new_threads_and_processes_from_zero_and_exited_threads_apart() -> None:
    before = {10: _process(10, "service 10", 100, {10: ("python", 60), 11: ("decode_0", 40)}),
              30: _process(30, "child 30", 5, {30: ("python", 5)})}
    after = {10: _process(10, "service 10", 190, {10: ("python", 90), 11: ("decode_0", 70),
                                                  12: ("decode_1", 20)}),
             20: _process(20, "child 20", 7, {20: ("python", 7)})}
    uses = cpu_used(before, after, tick_s=0.01)
    by = {(u.process, u.role, u.tid): round(u.cpu_s, 6) for u in uses}
    assert by == {("service 10", "main", 10): 0.3, ("service 10", "decode_*", 11): 0.3,
                  ("service 10", "decode_*", 12): 0.2,
                  # 90 ticks for the process, 80 for its live threads: 10 went with a thread
                  ("service 10", EXITED_THREADS, 0): 0.1,
                  ("child 20", "main", 20): 0.07}
    assert processes_gone(before, after) == ["child 30"]


def _use(process: str, tid: int, role: str, cpu_s: float) -> ThreadUse:
    return ThreadUse(process, tid, role, role, cpu_s)


USES = [_use("service 1", 1, "main", 1.0), _use("service 1", 2, "decode_*", 0.8),
        _use("service 1", 3, "decode_*", 0.8), _use("service 1", 0, EXITED_THREADS, 0.1),
        _use("engine 5", 5, "main", 0.3)]


def test_group_threads_sums_a_pool_per_process_costliest_first() -> None:
    groups = group_threads(USES, ok=1000)
    assert [(g.process, g.role, g.threads, g.cpu_ms_per_request) for g in groups] == [
        ("service 1", "decode_*", 2, 1.6), ("service 1", "main", 1, 1.0),
        ("engine 5", "main", 1, 0.3), ("service 1", EXITED_THREADS, 0, 0.1)]
    assert sum(g.share_pct for g in groups) == pytest.approx(100, abs=0.2)


def test_the_busiest_thread_is_one_thread_not_a_pool() -> None:
    busiest = busiest_thread(USES)
    assert busiest is not None and (busiest.process, busiest.tid) == ("service 1", 1)
    assert busiest_thread([_use("s", 0, EXITED_THREADS, 5.0)]) is None


def test_lone_threads_leave_out_pools_and_the_exited_threads() -> None:
    assert [(u.process, u.tid) for u in lone_threads(USES)] == [("service 1", 1),
                                                                 ("engine 5", 5)]


def test_thread_labels_name_the_main_unnamed_and_named_threads() -> None:
    assert thread_label(ThreadUse("s 1", 1, "python", "main", 0.0)) == "main"
    assert thread_label(ThreadUse("s 1", 7, "python", "tid 7", 0.0)) == "tid 7"
    assert thread_label(ThreadUse("s 1", 8, "decode_1", "decode_*", 0.0)) == "decode_1 (tid 8)"


def test_ceiling_is_bound_by_the_cores_or_by_the_busiest_thread() -> None:
    assert ceiling_rps(total_ms=5.0, busiest_ms=1.0, cores=2) == 400.0  # cores: 2/5 ms
    assert ceiling_rps(total_ms=5.0, busiest_ms=1.0, cores=16) == 1000.0  # one thread: 1/1 ms
    assert ceiling_rps(total_ms=5.0, busiest_ms=0.0, cores=16) == 3200.0
    assert ceiling_rps(total_ms=0.0, busiest_ms=0.0, cores=16) is None


def test_mean_batch_size_from_two_metrics_texts() -> None:
    before = "dfine_images_total 10.0\ndfine_batch_size_count 10.0\n"
    after = ('dfine_images_total{model="m",version="1"} 70.0\n'
             'dfine_batch_size_count{model="m",version="1"} 30.0\n')
    assert mean_batch_size(before, after) == 3.0
    assert mean_batch_size(before, before) is None and mean_batch_size(None, after) is None


def test_compare_prefixes_settings_and_passes_other_names_as_written() -> None:
    settings = {"preprocess", "frontends"}
    env = parse_compare("FRONTENDS=2 preprocess=fast OMP_NUM_THREADS=1 'X=a b'", settings)
    assert env == {"DFINE_FRONTENDS": "2", "DFINE_PREPROCESS": "fast",
                   "OMP_NUM_THREADS": "1", "X": "a b"}
    assert parse_compare("", settings) == {}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_compare("FRONTENDS", settings)


def _run(rps_ok: int) -> WrkRun:
    return WrkRun(rps_ok + 2, 2.0, 2, {}, {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0})


def test_summarize_run_gives_cpu_per_successful_request_and_both_ceilings() -> None:
    result = summarize_run("front-end", "tiny", 64, _run(1000), USES, [], client_cpu_s=0.2,
                           batch_size=1.5, cores=2)
    assert result.ok == 1000 and result.throughput_rps == 500.0 and result.non_2xx == 2
    assert result.cpu_ms_per_request == 3.0  # 3.0 s over 1000 answers
    assert result.busiest_thread == {"process": "service 1", "thread": "main", "role": "main",
                                     "tid": 1, "comm": "main", "cpu_ms_per_request": 1.0}
    assert result.busiest_lone_thread == result.busiest_thread
    assert result.ceiling_rps == {"this host (2 cores)": 666.7, "16 cores": 1000.0}
    assert result.client_cpu_ms_per_request == 0.2
    assert result.processes == ["engine 5", "service 1"]
    assert result.as_dict()["threads"][0]["role"] == "decode_*"


def test_a_busy_pool_bounds_this_host_but_not_a_bigger_one() -> None:
    uses = [_use("service 1", 1, "main", 0.5), _use("service 1", 2, "decode_*", 2.0),
            _use("service 1", 3, "decode_*", 2.0)]
    result = summarize_run("t", "photo", 64, _run(1000), uses, [], 0.0, None, cores=2)
    assert result.busiest_thread is not None and result.busiest_thread["tid"] == 2
    assert result.busiest_lone_thread is not None and result.busiest_lone_thread["tid"] == 1
    # Here: 2 cores / 4.5 ms and one decode thread at 2 ms; 16 cores: the event loop's 0.5 ms.
    assert result.ceiling_rps == {"this host (2 cores)": 444.4, "16 cores": 2000.0}


def test_median_result_keeps_every_repeats_throughput() -> None:
    runs = [summarize_run("t", "tiny", 1, _run(ok), USES, [], 0.0, None, 2)
            for ok in (300, 100, 200)]
    chosen = median_result(runs)
    assert chosen.throughput_rps == 100.0
    assert chosen.extra["repeats_rps"] == [150.0, 50.0, 100.0]


NAMED_CHILD = """
import ctypes, sys, threading
def spin():
    ctypes.CDLL(None).prctl(15, b"decode_0", 0, 0, 0)  # PR_SET_NAME, as the service will
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
sys.stdin.read()  # until the test closes stdin
"""


def test_snapshot_follows_children_and_reads_named_threads() -> None:
    child = subprocess.Popen([sys.executable, "-c", NAMED_CHILD], stdin=subprocess.PIPE)
    try:
        before = snapshot(os.getpid())
        assert before[os.getpid()].label == f"service {os.getpid()}"

        def named_thread_ran() -> list[ThreadUse]:
            uses = cpu_used(before, snapshot(os.getpid()))
            return [u for u in uses if u.process == f"child {child.pid}"
                    and u.role == "decode_*" and u.cpu_s > 0]

        [use] = wait_until(named_thread_ran, 30, "the child's decode_0 thread to use CPU")
        assert use.comm == "decode_0"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)


def test_the_in_process_preprocessing_cost_uses_the_targets_mode() -> None:
    from app.bench.images import synthetic_jpegs
    from app.bench.preprocess_cost import preprocess_ms, settings_for
    from tests.helpers import DEFAULT_MODEL

    fast = settings_for(DEFAULT_MODEL, {"DFINE_PREPROCESS": "fast", "OTHER": "x"})
    assert fast.preprocess == "fast" and fast.instant_engine
    assert settings_for(DEFAULT_MODEL, {}).preprocess == "exact"
    assert preprocess_ms(fast, synthetic_jpegs(1, 64, 48)[0], repeats=5) > 0
