"""`EngineGuard`, the part every stage shim runs its engine through (plain Python: no Ray needed)."""

import asyncio

import pytest

from deployments.stage import EngineGuard, ItemFailure


def encode(items: list[int]) -> list[int]:
    """A batch engine call that rejects one request's input, as an engine raises ValueError for a bad request."""
    if 13 in items:
        raise ValueError("13 is not a valid input")
    return [2 * item for item in items]


def test_one_bad_input_fails_alone_and_is_not_an_engine_fault():
    guard = EngineGuard("condition", max_consecutive_failures=1)
    results = asyncio.run(guard.run_batch(encode, [1, 13, 3]))
    assert results[0] == 2 and results[2] == 6  # its batch-mates are served
    assert isinstance(results[1], ItemFailure) and isinstance(results[1].error, ValueError)
    assert guard.failures == 0
    guard.check_health()  # a healthy replica is never replaced for a client's mistake


def test_engine_faults_count_toward_health(tmp_path):
    guard = EngineGuard("dit", max_consecutive_failures=2)
    flag = tmp_path / "broken"
    guard.fault = str(flag)
    assert asyncio.run(guard.run(encode, [1])) == [2]  # the hook does nothing while its file is absent
    flag.touch()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="fault injected"):
            asyncio.run(guard.run(encode, [1]))
    with pytest.raises(RuntimeError, match="failed 2 calls in a row"):
        guard.check_health()
