"""Tasks on the executors (pipeline/tasks.py): a function over numbered items, retried, on every executor."""

from __future__ import annotations

import pytest
from toystages import square_or_fail

from facecap.pipeline.errors import FacecapError
from facecap.pipeline.executors import LocalExecutor, ProcessExecutor
from facecap.pipeline.tasks import TaskJob, run_tasks

JOB = TaskJob(name="square", function=square_or_fail)


@pytest.mark.parametrize("executor", [LocalExecutor, lambda: ProcessExecutor(2)], ids=["local", "processes"])
def test_every_item_gets_its_own_result_whatever_the_executor(executor):
    seen = []
    results = run_tasks(executor(), JOB, ((n, {}) for n in range(7)), on_result=lambda n, r: seen.append(n))
    assert {n: r["square"] for n, r in results.items()} == {n: n * n for n in range(7)}
    assert sorted(seen) == list(range(7))


def test_an_item_that_keeps_failing_is_named_after_the_others_ran(tmp_path):
    marker = tmp_path / "fail"
    marker.write_text("on")
    payloads = [(0, {}), (1, {"fail_while": str(marker)}), (2, {})]
    done = []
    with pytest.raises(FacecapError, match=r"square: 1 item\(s\) failed; item 1: RuntimeError: simulated fault"):
        run_tasks(ProcessExecutor(2), JOB, payloads, max_retries=2, on_result=lambda n, r: done.append(n))
    assert sorted(done) == [0, 2]
    assert (tmp_path / "fail.tries").read_text().split() == ["1", "1", "1"]  # the first try and two retries


def test_a_failure_that_clears_is_retried_into_a_result(tmp_path):
    marker = tmp_path / "fail"
    marker.write_text("on")

    class ClearAfterFirstTry(LocalExecutor):
        def submit(self, shard, source, attempt):
            if attempt == 2:
                marker.unlink()
            return super().submit(shard, source, attempt)

    results = run_tasks(ClearAfterFirstTry(), JOB, [(3, {"fail_while": str(marker)})], max_retries=1)
    assert results[3]["square"] == 9
