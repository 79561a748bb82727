"""ResultStore on a real S3-compatible server (moto, loopback)."""

from jobs.storage import ResultStore

JOB = "12345678-1234-1234-1234-1234567890ab"


def test_s3_round_trip(s3_server):
    writer = ResultStore("s3://acestep-results/run1", s3_server)
    reader = ResultStore("s3://acestep-results/run1", s3_server)  # another replica, same bucket
    assert not writer.is_local
    key = writer.key(JOB, 1, "flac")
    writer.put(key, b"fLaC-bytes")
    assert reader.get(key) == b"fLaC-bytes"
    assert reader.local_path(key) is None
    assert reader.get(f"{JOB}/../../etc/passwd") is None
    writer.delete_job(JOB)
    assert reader.get(key) is None
