"""The native data-plane benchmark's parsers (bench/native.py), on output captured from the
real tools (iperf3 3.12 -J and sockperf 3.7 ping-pong on loopback; ab 2.3 and openssl 3.0
s_time between two lab nodes; all Debian 12)."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import native  # noqa: E402  pylint: disable=wrong-import-position

SOCKPERF = """sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=62959
sockperf: Summary: Round trip is 30.713 usec
sockperf: ---> <MAX> observation = 4060.838
sockperf: ---> percentile 99.999 = 3979.461
sockperf: ---> percentile 99.000 =   77.034
sockperf: ---> percentile 90.000 =   52.388
sockperf: ---> percentile 50.000 =   13.169
sockperf: ---> <MIN> observation =   10.966
"""


def test_sockperf_percentiles_are_read_in_microseconds():
    assert native.sockperf_percentiles(SOCKPERF) == {"p50_us": 13.169, "p99_us": 77.034}
    with pytest.raises(RuntimeError):
        native.sockperf_percentiles("sockperf: ERROR: connect failed")


def test_iperf3_summary_reads_received_throughput_and_cpu():
    text = (ROOT / "tests" / "unit" / "data" / "iperf3-loopback.json").read_text()
    out = native.iperf3_summary(text)
    assert 1 < out["gbit_s"] < 1000 and out["bytes"] > 0
    assert 0 < out["cpu_client_pct"] <= 100 and 0 < out["cpu_server_pct"] <= 100
    with pytest.raises(RuntimeError):
        native.iperf3_summary(json.dumps({"error": "unable to connect to server"}))


PERF_DSO = """# To display the perf.data header info, please use --header/--header-only options.
#
# Total Lost Samples: 0
#
# Samples: 5K of event 'cpu-clock:ppp'
# Event count (approx.): 5005005000
#
# Overhead  Shared Object
# ........  .................
#
    61.52%  [kernel.kallsyms]
    37.10%  consul
     1.38%  [vdso]
"""


def test_perf_shares_reads_the_percentage_lines_only():
    assert native.perf_shares(PERF_DSO) == [(61.52, "[kernel.kallsyms]"), (37.10, "consul"),
                                            (1.38, "[vdso]")]
    assert native.perf_shares("# Overhead  Symbol\n#\n") == []


def test_ab_percentiles_are_read_from_its_csv_in_milliseconds():
    # ``ab -n 100 -c 1 -e`` against nginx on the node's IP (direct): rows 0..100
    text = (ROOT / "tests" / "unit" / "data" / "ab-direct-100.csv").read_text()
    assert native.ab_percentiles(text) == {"p50_ms": 0.099, "p99_ms": 0.434}
    with pytest.raises(RuntimeError, match="no percentiles"):
        native.ab_percentiles("apr_socket_recv: Connection refused (111)\n")


AB_404 = """Concurrency Level:      1
Time taken for tests:   0.002 seconds
Complete requests:      5
Failed requests:        2
   (Connect: 0, Receive: 0, Length: 2, Exceptions: 0)
Non-2xx responses:      5
"""


def test_ab_failures_count_failed_and_non_2xx_requests():
    assert native.ab_failures(AB_404) == 7
    assert native.ab_failures("Complete requests:      300\nFailed requests:        0\n") == 0


def test_ab_needs_enough_requests_for_its_99th_percentile():
    # ab's CSV row i reads sample int(0.5 + n * i / 100): past the last one below 51 requests
    with pytest.raises(ValueError, match="at least 100"):
        native.new_connections(None, "n1", "10.77.0.12", 8082, 50)


def test_nginx_serves_the_mesh_target_and_the_direct_port_from_one_worker():
    conf = native.nginx_conf(8082, "10.77.0.12", 15203)
    assert "listen 127.0.0.1:8082;" in conf and "listen 10.77.0.12:15203;" in conf
    assert "worker_processes 1;" in conf and "daemon off;" in conf
    assert "access_log off;" in conf


S_TIME_NEW = """s_time: verify depth is 1
Collecting connection statistics for 3 seconds
************************************************************

1497 connections in 1.16s; 1290.52 connections/user sec, bytes read 71856
1497 connections in 4 real seconds, 48 bytes read per connection
wall 1000000000 4582199000
"""


def test_s_time_per_connection_is_wall_time_over_connections():
    out = native.s_time_per_connection(S_TIME_NEW)
    assert out["connections"] == 1497
    assert out["per_connection_ms"] == pytest.approx(3582.199 / 1497)
    refused = S_TIME_NEW.replace("48 bytes read per connection", "0 bytes read per connection")
    with pytest.raises(RuntimeError, match="no completed connection"):
        native.s_time_per_connection(refused)
    with pytest.raises(RuntimeError):
        native.s_time_per_connection("connect: Connection refused\nwall 1 2\n")
