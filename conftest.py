"""Fixtures shared by tests/ and compat_tests/: the real default model, in-process and as a live stack."""

from __future__ import annotations

import pytest

from tests.stack import running_stack


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
