"""The test command itself: ``make test`` distributes with ``--dist loadgroup`` and the grouping takes effect.

The env-parity tests put every test of one task in one ``xdist_group`` so the task's MJX programs are traced and
compiled once per suite; with a pytest/xdist pair that drops the group silently (pytest 9.2 with xdist 3.8,
pytest-xdist issue 1386), nothing fails but the suite gets slower, so this checks the mechanism directly.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

GROUPED = '''
import os
import pytest

PARAMS = [pytest.param(i, id=f"p{i}", marks=pytest.mark.xdist_group(f"g{i % 2}")) for i in range(8)]


@pytest.mark.parametrize("i", PARAMS)
def test_record(i):
    with open(os.environ["GROUP_LOG"], "a") as f:
        f.write(f"g{i % 2} {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''


def test_make_test_runs_loadgroup():
    target = re.search(r"^test:.*?(?=^\S)", (REPO / "Makefile").read_text() + "\nend", re.S | re.M).group(0)
    assert re.search(r"pytest -n 2 --dist loadgroup\b", target), target


def test_loadgroup_keeps_each_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    log = tmp_path / "groups.log"
    env = {**os.environ, "GROUP_LOG": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                           "-p", "no:cacheprovider", "test_grouped.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = collections.defaultdict(set)
    for line in log.read_text().splitlines():
        group, worker = line.split()
        workers[group].add(worker)
    assert sorted(workers) == ["g0", "g1"]
    assert all(len(w) == 1 for w in workers.values()), (
        f"--dist loadgroup spread a group over workers: {dict(workers)} (pytest {pytest.__version__})")
