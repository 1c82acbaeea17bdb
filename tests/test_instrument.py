"""The per-call log line carries the ids an operator searches for."""

from __future__ import annotations

import logging

import pytest

from cri_shim.gen.runtime import v1 as cri
from cri_shim.instrument import Instrumentation


async def test_created_ids_from_the_response_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    instrument = Instrumentation()
    request = cri.CreateContainerRequest(pod_sandbox_id="pod-1")

    async def create(_: cri.CreateContainerRequest) -> cri.CreateContainerResponse:
        return cri.CreateContainerResponse(container_id="ctr-1")

    with caplog.at_level(logging.INFO, logger="cri_shim.rpc"):
        await instrument.unary("CreateContainer", create, request)
    (record,) = [r for r in caplog.records if r.getMessage() == "rpc"]
    fields = record.cri_fields  # type: ignore[attr-defined]
    assert (fields["rpc"], fields["pod"], fields["container"]) == (
        "CreateContainer",
        "pod-1",
        "ctr-1",
    )
