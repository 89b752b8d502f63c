"""The harness itself: a helper thread's failed assertion fails its test, and in CI a missing
engine fails instead of skipping. Each runs a small suite in a pytest subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

HERE = Path(__file__).parent


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A directory with the real conftest.py (and what it imports), for a test file to join."""
    for name in ("conftest.py", "handlers.py", "proc.py"):
        shutil.copy(HERE / name, pytester.path / name)
    return pytester


def test_a_failed_assertion_in_a_helper_thread_fails_the_test(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_thread="""
        import threading

        def test_client_thread_asserts():
            def client():
                assert 1 + 1 == 3, "the client saw the wrong reply"
            thread = threading.Thread(target=client, name="a-client")
            thread.start()
            thread.join()
    """)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the failure is reported at teardown
    result.stdout.fnmatch_lines(["*a helper thread raised*", "*the client saw the wrong reply*"])


@pytest.mark.parametrize(("ci", "outcome"), [
    ("true", {"errors": 1}), ("1", {"errors": 1}), ("YES", {"errors": 1}),
    ("", {"skipped": 1}), ("false", {"skipped": 1}), ("0", {"skipped": 1})])
def test_a_missing_uvloop_fails_in_ci_and_skips_elsewhere(
        suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str,
        outcome: dict[str, int]) -> None:
    suite.makepyfile(hide_uvloop="""
        import sys
        sys.modules["uvloop"] = None  # import and find_spec now see no uvloop
    """)
    suite.makepyfile(test_engine="""
        def test_on_every_engine(engine):
            assert engine in ("epoll", "asyncio")
    """)
    monkeypatch.setenv("CI", ci)
    result = suite.runpytest_subprocess("-p", "hide_uvloop", "-p", "no:cacheprovider", "-k",
                                        "uvloop")
    result.assert_outcomes(**outcome)
    if "errors" in outcome:
        result.stdout.fnmatch_lines(["*uvloop*is missing*CI=true*"])


def test_one_ci_rule_everywhere() -> None:
    """Only conftest reads ``CI`` (``IN_CI``, used by ``require``): a test file with its own
    reading would drift from the rule (it did: two tests failed on CI=false)."""
    readers = [path.name for path in HERE.glob("*.py") if path.name != "conftest.py"
               and '"CI"' in path.read_text() and path.name != "test_harness.py"]
    assert readers == []


def test_a_helper_threads_failure_fails_the_test_joined_or_not(suite: pytest.Pytester) -> None:
    """``join`` re-raises a ``HelperThread``'s exception in the test; one never joined fails
    the test when it ends; a helper still running after the join's timeout fails it too."""
    suite.makepyfile(test_helpers="""
        import threading
        from conftest import join, start_helper

        def test_joined():
            def client():
                assert 1 + 1 == 3, "joined and re-raised"
            join(start_helper(client))

        def test_forgotten():
            def client():
                assert 1 + 1 == 3, "never joined"
            start_helper(client)

        def test_stuck():
            stop = threading.Event()
            thread = start_helper(lambda: stop.wait(5))
            try:
                join(thread, timeout=0.1)
            finally:
                stop.set()
    """)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, passed=1, errors=1)
    result.stdout.fnmatch_lines(["*joined and re-raised*"])
    result.stdout.fnmatch_lines(["*never joined*"])
    result.stdout.fnmatch_lines(["*still running after 0.1 s*"])
