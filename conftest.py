"""Fixtures shared by tests/ and compat_tests/: the real default model, in-process and as a live stack."""

from __future__ import annotations

import os

import pytest

from tests.stack import running_stack

# Under CI every dependency .ci/run installs is there: a test skipped for a missing import is a failure.
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_missing_dependency(report) -> None:
    if _IN_CI and report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI for a missing dependency (.ci/run installs it): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # a module-level importorskip skips at collection
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.fixture(scope="session")
def model_service():
    """The real default model loaded in-process, engine thread running, plain decoding (no Medusa, no
    prompt lookup; grammar fast-forward only while a sequence decodes alone)."""
    from backend.config import BackendSettings
    from backend.runtime import ModelService

    service = ModelService(BackendSettings(ctx_size=1024, n_parallel=4, threads=2, medusa_heads="none",
                                           prompt_lookup="off"))
    service.load()
    assert service.error is None, service.error
    yield service
    service.engine.shutdown()


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack-logs")) as stack:
        yield stack
