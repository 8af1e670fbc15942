"""ReadyLine: what services print once serving and what the launcher reads back."""

from __future__ import annotations

from scalellm.lifecycle import ReadyLine


def test_round_trip_with_fields() -> None:
    line = ReadyLine("0.0.0.0:8000", {"grpc": "0.0.0.0:50051"})
    assert str(line) == "READY 0.0.0.0:8000 grpc=0.0.0.0:50051"
    parsed = ReadyLine.parse(str(line))
    assert parsed == line
    assert parsed.port_of() == 8000 and parsed.port_of("grpc") == 50051


def test_plain_address_and_other_lines() -> None:
    assert ReadyLine.parse("READY 127.0.0.1:50070") == ReadyLine("127.0.0.1:50070")
    assert ReadyLine.parse("READY redis://127.0.0.1:6379/0 redis_pid=42") == ReadyLine(
        "redis://127.0.0.1:6379/0", {"redis_pid": "42"}
    )
    for other in ("", "READY", "READY ", "ready 1.2.3.4:5", "INFO READY 1.2.3.4:5"):
        assert ReadyLine.parse(other) is None, other
