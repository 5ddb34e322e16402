"""bench/load.py, briefly: concurrent /predict clients against a created text-classifier backend
under gunicorn, with and without training on webhooks."""
import glob
import importlib.util
import re
import tempfile
from pathlib import Path

from support import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_with_training_has_no_failures(capsys):
    bench = load_bench()
    leftovers = set(glob.glob(str(Path(tempfile.gettempdir()) / "lsdeploy-load-*")))
    cases = bench.main(["--seconds", "3", "--clients", "4", "--workers", "1", "--threads", "4"])
    out = capsys.readouterr().out
    print(out)
    for label in ("without training", "with training"):
        assert cases[label]["latencies"], f"no /predict answered {label}"
        assert cases[label]["failed"] == [], cases[label]["failed"]
        line = re.search(rf"^  {label} +requests +\d+ +failed +0 .*p50 +[\d.]+ ms +p99 +[\d.]+ ms", out, re.M)
        assert line, out
    webhooks = cases["with training"]["webhooks"]
    assert webhooks and all(isinstance(s, int) and 200 <= s < 300 for s in webhooks), webhooks
    assert "p99 ratio with/without training" in out
    assert set(glob.glob(str(Path(tempfile.gettempdir()) / "lsdeploy-load-*"))) <= leftovers  # cleaned up
