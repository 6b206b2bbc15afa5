"""The native data-plane benchmark's parsers (bench/native.py), on output captured from the
real tools (iperf3 3.12 -J and sockperf 3.7 ping-pong, Debian 12, loopback)."""
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
