"""shared.wire: what a message costs on the wire."""

from __future__ import annotations


def test_over_max_payload_counts_the_header_block_at_every_boundary() -> None:
    """The quick bound (no header block built when clearly under) gives the same answer
    as measuring the block, at and around the limit, with non-ASCII values too."""
    from types import SimpleNamespace

    from shared.wire import header_block, over_max_payload

    for headers in ({"Nats-Msg-Id": "s:1"}, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                             "Nats-Msg-Id": "sess-é✓:42"}):
        block = len(header_block(headers))
        for max_payload in (block + 100, 1 << 20):
            nc = SimpleNamespace(max_payload=max_payload)
            for size in range(max(0, max_payload - block - 40), max_payload - block + 3):
                want = size + block > max_payload
                assert over_max_payload(nc, b"x" * size, headers) is want, (headers, max_payload, size)
                assert over_max_payload(nc, b"x" * size, header_block(headers)) is want
