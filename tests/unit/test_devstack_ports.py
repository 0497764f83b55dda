"""Free ports for a stack (devstack.scratch): every server of one stack gets a port of its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from devstack import scratch as stack


def test_no_port_is_given_twice_nor_on_a_seaweedfs_grpc_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The OS hands out ports that are free now; none of the stack's is bound yet, so it may
    # hand out one twice, or one that SeaweedFS will bind as a gRPC port (its port + 10000).
    offered: Iterator[int] = iter([30001, 30001, 40001, 30002, 30003, 30004, 30005, 40003,
                                   40004, 30006, 30006, 41000, 41001, 41002, 41003, 41004,
                                   41005, 41006])  # fmt: skip
    monkeypatch.setattr(stack, "free_port", lambda: next(offered))
    monkeypatch.setattr(stack, "port_free", lambda port, **_: True)
    ports = dataclasses.asdict(stack.free_ports())
    grpc = {ports[name] + 10000 for name in ("s3", "weed_master", "weed_volume", "weed_filer",
                                              "weed_admin")}  # fmt: skip
    chosen = list(ports.values())
    assert len(set(chosen)) == len(chosen)
    assert not grpc & set(chosen)
