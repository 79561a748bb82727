"""`acestep-bench --control-plane`'s own parts: its HTTP/1.1 load client and its anchor app (no Ray)."""

from __future__ import annotations

import asyncio
import json

from deployments import bench_control


class _Transport:
    def __init__(self):
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass


def test_client_reads_keep_alive_answers_split_anywhere():
    """Content-Length and chunked answers, cut into 7-byte pieces: each is counted once, with its status, the job ids
    of 200s are kept, and the next request goes out as each answer completes."""
    body = [json.dumps({"job_id": name, "status": "queued"}, separators=(",", ":")).encode() for name in "ab"]
    stream = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body[0]), body[0])
              + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body[1]), body[1])
              + b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}")
    loop = asyncio.new_event_loop()
    try:
        load = bench_control._Load([b"GET / HTTP/1.1\r\n\r\n"], warmup_s=0.0, seconds=600.0, collect_ids=True)
        connection, transport = bench_control._Connection(load, loop.create_future()), _Transport()
        connection.connection_made(transport)
        for i in range(0, len(stream), 7):
            connection.data_received(stream[i:i + 7])
    finally:
        loop.close()
    assert dict(load.statuses) == {200: 2, 429: 1} and len(load.latencies) == 3
    assert load.job_ids == ["a", "b"]
    assert len(transport.written) == 4


def test_client_polls_the_anchor_from_its_own_process():
    """The anchor (FastAPI under uvicorn, a dict) answers the load client, which runs in a process of its own."""
    view = {"job_id": "job-1", "status": "succeeded", "result": {"audio_paths": ["/v1/audio?path=job-1%2F0.wav"]}}
    result = bench_control.measure_anchor(view, {"connections": 4, "warmup_s": 0.2, "seconds": 0.5})
    assert result["requests"] > 0 and result["statuses"] == {"200": result["requests"]}
    assert result["reconnects"] == result["connect_errors"] == result["hung_connections"] == 0
    assert result["p50_ms"] <= result["p99_ms"]
    assert set(result["server_cpu_ms_per_request"]) == {"anchor"}  # the server's CPU, read around the window
