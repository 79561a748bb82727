"""Shared fixtures: one real Ray instance and Serve HTTP proxy per test session, apps deployed on demand."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()  # Ray's Prometheus export port in the test cluster


@pytest.fixture(scope="session")
def serve_http():
    """Ray (8 logical CPUs on a 2-core box, every replica asks for 0) + Serve's HTTP proxy on a free port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
             _metrics_export_port=METRICS_PORT,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       # autoscaling metrics every 0.5 s (default 10 s), so a test burst is seen
                                       "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                                       "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_http) -> str:
    """Ray's Prometheus endpoint of the test cluster (read here: conftest may be imported twice under two names)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


def deploy(args: dict, name: str, route_prefix: str, base_url: str, timeout: float = 180.0,
           options: dict | None = None) -> str:
    """Run `build_graph(args, options)` as application `name` and wait until it answers /health."""
    import httpx
    from ray import serve

    from deployments.app import build_graph

    serve.run(build_graph(args, options), name=name, route_prefix=route_prefix, blocking=False)
    url = base_url + (route_prefix if route_prefix != "/" else "")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"app {name} not healthy after {timeout} s")


@contextlib.contextmanager
def deployed(args: dict, name: str, route_prefix: str, base_url: str, options: dict | None = None):
    """`deploy`, then delete the app and its registry actor: this 2-core, 24 GiB box holds only a few apps."""
    import ray
    from ray import serve

    try:
        yield deploy(args, name, route_prefix, base_url, options=options)
    finally:
        serve.delete(name)
        try:
            ray.kill(ray.get_actor(f"registry-{name}", namespace="acestep"))
        except ValueError:  # never created
            pass


def wav_bytes(seconds: float = 1.0, sample_rate: int = 44100, channels: int = 1, fmt: str = "WAV") -> bytes:
    """A real audio file: a 440 Hz tone, at a rate and channel count the service must convert."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, format=fmt)
    return buffer.getvalue()


# Samples a decoder returns beyond those written, (least, most): mp3 (libsndfile's decoder reads LAME's Info tag) and
# Ogg Opus (the pre-skip and the last granule position) are trimmed exactly; ADTS AAC cannot say what to trim, so the
# encoder's 1024 priming samples come first and the last frame is padded to a whole 1024.
EXTRA_SAMPLES = {"mp3": (0, 0), "wav": (0, 0), "flac": (0, 0), "opus": (0, 0), "aac": (1024, 2047), "wav32": (0, 0)}


def decode_audio(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """A result file's float32 `(channels, samples)` and sample rate: PyAV (FFmpeg) for aac, soundfile for the rest."""
    if fmt == "aac":
        import av  # here: the GPU tests run where PyAV may be missing (models/audio_io.py imports it lazily too)

        with av.open(io.BytesIO(data)) as container:
            rate = container.streams.audio[0].rate
            audio = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
        return audio, rate
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.T, rate


MP3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # MPEG-1 Layer III, by bitrate index


def mp3_frame_bitrates(data: bytes) -> tuple[list[int], bytes]:
    """Each frame's bitrate (kbps), read from the MPEG-1 Layer III 48 kHz frame headers, and the first frame (where
    LAME writes its Xing tag for VBR, Info for CBR). Every byte must be a frame's, bar an ID3v1 trailer."""
    rates, start = [], 0
    while start + 4 <= len(data) and data[start] == 0xFF and data[start + 1] & 0xFE == 0xFA:
        assert data[start + 2] >> 2 & 3 == 1, "not 48 kHz"
        rates.append(MP3_KBPS[data[start + 2] >> 4])
        start += 144 * rates[-1] * 1000 // 48000 + (data[start + 2] >> 1 & 1)
    assert data[start:] in (b"", data[-128:]) and data[start:start + 3] in (b"", b"TAG"), f"junk at byte {start}"
    return rates, data[: 144 * rates[0] * 1000 // 48000]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields fsspec storage options for it."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="acestep-results")
    yield options
    process.terminate()
    process.wait(timeout=10)
