import pytest

from jobs.storage import ResultStore

JOB = "12345678-1234-1234-1234-1234567890ab"


def test_put_and_path(tmp_path):
    store = ResultStore(tmp_path)
    key = store.key(JOB, 0, "mp3")
    store.put(key, b"data")
    assert store.local_path(key).read_bytes() == b"data" and store.get(key) == b"data"
    assert store.url(key) == f"/v1/audio?path={JOB}%2F0.mp3"
    store.delete_job(JOB)
    assert store.local_path(key) is None and store.get(key) is None


@pytest.mark.parametrize("key", ["/etc/passwd", f"{JOB}/../../x.mp3", f"../{JOB}/0.mp3", f"{JOB}/0.exe",
                                 f"{JOB}/0.mp3/..", "", f"{JOB.upper()}/0.mp3"])
def test_only_well_formed_keys(tmp_path, key):
    store = ResultStore(tmp_path)
    assert not store.is_key(key) and store.local_path(key) is None and store.get(key) is None
    with pytest.raises(ValueError):
        store.put(key, b"x")
