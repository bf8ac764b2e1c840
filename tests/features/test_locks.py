"""Locks that hold on every storage tlsweep accepts, and a cache that survives a network share.

Fast tests without TensorFlow: the worker lock of each storage kind (MySQL's GET_LOCK results
through a stand-in connection), SQLite refused on a network filesystem, and the feature
cache's publication, clearing and lock files when two machines share the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError, StudyFailing, TlsweepError
from tlsweep.features import _cache as F
from tlsweep.features import _entries as E
from tlsweep.study import _storage as ST
from tlsweep.study._recovery import recover

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/share nfs4 rw,relatime,vers=4.2 0 0
//nas/photos /mnt/share/smb cifs rw 0 0
tmpfs /mnt/share/local tmpfs rw 0 0
"""


# --- network filesystems --------------------------------------------------------------------
def test_network_filesystem_is_read_from_the_longest_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    nfs = ST.network_filesystem
    assert nfs(Path("/mnt/share/x/optuna.db"), str(mounts)) == "nfs4"
    assert nfs(Path("/mnt/share"), str(mounts)) == "nfs4"
    assert nfs(Path("/mnt/share/smb/a.db"), str(mounts)) == "cifs"
    assert nfs(Path("/mnt/share/local/a.db"), str(mounts)) is None
    assert nfs(Path("/mnt/sharelike/a.db"), str(mounts)) is None
    assert nfs(Path("/home/u/a.db"), str(mounts)) is None
    assert nfs(Path("/x"), str(tmp_path / "no_mounts")) is None  # cannot tell: allowed


def test_sqlite_storage_on_a_network_filesystem_is_refused_and_nothing_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import write_sweep

    db = tmp_path / "share" / "optuna.db"
    bb = {"name": "MobileNetV2", "weights": "none", "input_size": 96}
    cfg = load_sweep(
        write_sweep(tmp_path / "s.yaml", tmp_path, backbones=[bb], storage=f"sqlite:///{db}"),
        check_data_dir=False,
    )
    monkeypatch.setattr(ST, "network_filesystem", lambda path, mounts="": "nfs4")
    with pytest.raises(ConfigError) as e:
        ST.open_storage(cfg)
    msg = str(e.value)
    assert msg.startswith(f"storage: {db} is on a network filesystem (nfs4)")
    assert "postgresql://" in msg and "journal:" in msg
    assert not db.parent.exists()


# --- the worker lock per storage ------------------------------------------------------------
def _max_inside(lock, n: int = 3, hold: float = 0.05) -> int:  # noqa: ANN001
    """How many threads were inside ``lock()`` at once, out of ``n`` trying together."""
    inside, most, guard = [0], [0], threading.Lock()

    def work() -> None:
        with lock():
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(hold)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return most[0]


def test_journal_lock_on_a_network_share_is_a_symlink_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"journal:{tmp_path / 'optuna.log'}"
    monkeypatch.setattr(ST, "network_filesystem", lambda path, mounts="": "nfs4")
    assert _max_inside(lambda: ST.storage_lock(url, "s")) == 1
    assert not (tmp_path / "optuna.log.lock").exists()  # not the flock file
    assert not (tmp_path / "optuna.log.tlsweep.lock").exists()  # released: the link is gone
    with ST.storage_lock(url, "s"):
        assert (tmp_path / "optuna.log.tlsweep.lock").is_symlink()


def test_journal_and_sqlite_locks_on_a_local_disk_are_flocks(tmp_path: Path) -> None:
    for url in (f"journal:{tmp_path / 'optuna.log'}", f"sqlite:///{tmp_path / 'o.db'}"):
        assert _max_inside(lambda u=url: ST.storage_lock(u, "s")) == 1
    assert (tmp_path / "optuna.log.lock").exists() and (tmp_path / "o.db.lock").exists()


class _MySQL:
    """A stand-in connection answering GET_LOCK with the given results, in order."""

    def __init__(self, results: list) -> None:
        self.results = results
        self.calls: list[str] = []

    def execute(self, statement, params):  # noqa: ANN001, ANN201
        self.calls.append(str(statement))
        result = self.results.pop(0)
        return type("R", (), {"scalar": lambda self: result})()


def test_mysql_get_lock_waits_on_a_timeout_and_fails_on_null(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    con = _MySQL([0, 0, 1])  # timed out twice (another worker holds it), then got it
    ST._mysql_get_lock(con, "tlsweep1")
    assert len(con.calls) == 3 and all("GET_LOCK" in c for c in con.calls)
    assert sum("waiting for the study's lock" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(StudyFailing, match="returned NULL"):
        ST._mysql_get_lock(_MySQL([None]), "tlsweep1")
    monkeypatch.setattr(ST, "LOCK_GIVE_UP", 3 * ST.LOCK_WAIT)
    with pytest.raises(StudyFailing, match="held the study's lock"):
        ST._mysql_get_lock(_MySQL([0, 0, 0]), "tlsweep1")


# --- the feature cache on a shared folder ---------------------------------------------------
def _fake_entry(path: Path, key: str = "k" * 64) -> Path:
    """A complete, verifying entry folder (no TensorFlow needed)."""
    import json

    import numpy as np

    path.mkdir(parents=True)
    np.save(path / "features.npy", np.zeros((2, 3), np.float32))
    parts = {"x": 1}
    key = E.cache_key(parts)
    manifest = {
        "format": E.CACHE_FORMAT,
        "complete": True,
        "key": key,
        "key_parts": parts,
        "shape": [2, 3],
        "dtype": "float32",
        "files": [{"path": "a.jpg", "label": 0, "split": "train", "row": 0}],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_publishing_onto_an_entry_another_machine_published_uses_theirs(tmp_path: Path) -> None:
    final = _fake_entry(tmp_path / "cache" / "E")
    key = E.read_entry(final).key
    before = (final / "manifest.json").stat().st_mtime_ns
    ours = _fake_entry(tmp_path / "cache" / "E.tmp-otherhost-1-abcd")
    theirs = E.publish(ours, final, key)
    assert theirs is not None and theirs.path == final and theirs.key == key
    assert not ours.exists()  # ours dropped; theirs untouched
    assert (final / "manifest.json").stat().st_mtime_ns == before
    fresh = _fake_entry(tmp_path / "cache" / "N.tmp-h-1-abcd")
    assert E.publish(fresh, tmp_path / "cache" / "N", key) is None  # nobody was first
    assert (tmp_path / "cache" / "N" / "manifest.json").is_file()


def test_publishing_onto_a_damaged_entry_is_an_error_not_a_crash(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "E"
    final.mkdir(parents=True)
    (final / "manifest.json").write_text("{half")
    ours = _fake_entry(tmp_path / "cache" / "E.tmp-h-1-abcd")
    with pytest.raises(TlsweepError, match="at the same time and it does not verify"):
        E.publish(ours, final, "k")
    assert final.exists()


def test_clear_leaves_an_extraction_in_progress_alone(tmp_path: Path) -> None:
    import fcntl
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    _fake_entry(cache / "Old-96-avg-0123")
    live = cache / f"New-96-avg-4567.tmp-{socket.gethostname()}-{os.getpid()}-abcd1234"
    live.mkdir()
    other = cache / "New-96-avg-4567.tmp-otherhost-12-abcd1234"  # another machine, just now
    other.mkdir()
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    dead = cache / f"Gone-96-avg-89ab.tmp-{socket.gethostname()}-{dead_proc.pid}-abcd1234"
    dead.mkdir()
    old_foreign = cache / "Gone-96-avg-89ab.tmp-otherhost-13-abcd1234"
    old_foreign.mkdir()
    week = time.time() - 7 * 24 * 3600
    os.utime(old_foreign, (week, week))
    held, free = cache / "New-96-avg-4567.lock", cache / "Old-96-avg-0123.lock"
    held.touch()
    free.touch()
    fd = os.open(held, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = F.FeatureCache(cache).clear()
    finally:
        os.close(fd)
    assert removed == ["Old-96-avg-0123"]
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([live.name, other.name, held.name]), left


_HOLD = """
import sys, time
from pathlib import Path
from tlsweep.files import held_lock
with held_lock(Path(sys.argv[1]), "testing"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_wait_is_bounded_and_names_the_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds an entry lock: the wait is logged with its lock file, pid, host
    and start, and ends after the timeout with one line saying who holds it and what to do."""
    import socket
    import subprocess
    import sys

    import tlsweep.config
    from tlsweep import files
    from tlsweep.errors import ServiceError

    monkeypatch.setattr(files, "LOCK_POLL", 0.05)  # the lock helpers live in tlsweep.files
    lock = tmp_path / "E.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        written = json.loads(lock.read_text())
        assert written["pid"] == holder.pid and written["host"] == socket.gethostname()
        who = f"pid {holder.pid} on host {socket.gethostname()} since {written['since']}"
        caplog.set_level("INFO", logger="tlsweep")
        # the default (read through the config's face), then the env's
        monkeypatch.setattr(tlsweep.config, "DEFAULT_LOCK_TIMEOUT", 0.3)
        with pytest.raises(ServiceError, match="after 0.3s"), E.entry_lock(tmp_path, "E"):
            pytest.fail("the lock was taken while another process holds it")
        monkeypatch.setenv("TLSWEEP_LOCK_TIMEOUT", "0.5")
        with pytest.raises(ServiceError) as e, E.entry_lock(tmp_path, "E"):
            pytest.fail("the lock was taken while another process holds it")
        msg = str(e.value)
        assert msg.startswith(f"{lock}: still held by {who} after 0.5s") and "\n" not in msg
        assert f"waiting for {lock}, held by {who}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    with E.entry_lock(tmp_path, "E"):  # its holder gone, the lock is free at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_sqlite_storage_lock_wait_is_bounded_and_names_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from tlsweep.errors import ServiceError

    monkeypatch.setattr(ST, "LOCK_GIVE_UP", 0.3)
    lock = tmp_path / "o.db.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock)], stdout=subprocess.PIPE, text=True
    )
    got: list[BaseException] = []

    def wait() -> None:
        try:
            with ST.storage_lock(f"sqlite:///{tmp_path / 'o.db'}", "s"):
                pass
        except BaseException as e:  # noqa: BLE001 - what the waiter met, checked below
            got.append(e)

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive(), "the wait for the storage lock is unbounded"
    finally:
        holder.kill()
        holder.wait()
    assert len(got) == 1 and isinstance(got[0], ServiceError)
    assert str(got[0]).startswith(f"{lock}: still held by pid {holder.pid} on host ")


def test_entry_lock_follows_a_lock_file_deleted_by_clear(tmp_path: Path) -> None:
    """Holder A; B opened the lock file and waits; `cache clear` deletes the file; C creates a
    new one. B, once A is done, must find its file gone and lock C's, not run beside C."""
    order: list[str] = []
    a_in, c_may = threading.Event(), threading.Event()

    def a() -> None:
        with E.entry_lock(tmp_path, "E"):
            a_in.set()
            c_may.wait(10)
            time.sleep(0.2)
            order.append("A")

    def b() -> None:
        a_in.wait(10)
        with E.entry_lock(tmp_path, "E"):
            order.append("B in")
            time.sleep(0.2)
            order.append("B out")

    def c() -> None:
        a_in.wait(10)
        time.sleep(0.1)  # B is waiting on the old file
        (tmp_path / "E.lock").unlink()  # what clear did before it checked for holders
        c_may.set()
        with E.entry_lock(tmp_path, "E"):
            order.append("C in")
            time.sleep(0.4)
            order.append("C out")

    threads = [threading.Thread(target=f) for f in (a, b, c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # B and C never overlap: whichever entered first left before the other came in (A held
    # the deleted file already: why clear leaves a held lock file alone)
    bc = [x for x in order if x != "A"]
    assert bc in (["B in", "B out", "C in", "C out"], ["C in", "C out", "B in", "B out"]), order


def test_cache_publish_rename_error_other_than_exists_is_raised(tmp_path: Path) -> None:
    ours = _fake_entry(tmp_path / "E.tmp-h-1-abcd")
    with pytest.raises(FileNotFoundError):
        E.publish(ours, tmp_path / "missing_dir" / "E", "k")
    shutil.rmtree(ours)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_server_lock_excludes_and_recover_finds_orphans_under_it(kind: str) -> None:
    """pg_advisory_lock / GET_LOCK on a real server exclude; an untagged RUNNING trial seen
    under the lock is failed at once."""
    import warnings

    import optuna
    from conftest import server_url
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = server_url(kind)
    name = f"locks-{os.getpid()}-{time.time_ns()}"
    assert _max_inside(lambda: ST.storage_lock(url, name)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = RDBStorage(url, heartbeat_interval=1, grace_period=60)
        study = optuna.create_study(study_name=name, storage=storage)
        study.ask().suggest_float("x", 0, 1)
        retry = RetryHeartbeatStaleTrialCallback(3)
        assert recover(study, retry, 3600, lock=lambda: ST.storage_lock(url, name)) == [0]
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    optuna.delete_study(study_name=name, storage=storage)
