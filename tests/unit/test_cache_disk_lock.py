"""The disk store's per-key collapsing lock between real processes: held, seen, given back, and dropped by
the kernel when its holder dies."""

import signal
import subprocess
import sys
import textwrap

from bastion.cache.disk_store import DiskStore, lock_offset


def other_process(folder, code: str) -> str:
    """Run `code` with `store` (a DiskStore on `folder`) in a separate Python process; its printed output."""
    script = "from bastion.cache.disk_store import DiskStore\n" \
             f"store = DiskStore({str(folder)!r}, 1 << 20)\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          check=True).stdout.split()


def test_a_key_locked_here_is_seen_locked_elsewhere_until_unlocked(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    assert store.try_lock(b"http://a/x") is True
    assert store.try_lock(b"http://a/x") is False  # a second request of this process waits too
    assert store.is_locked(b"http://a/x") is True
    assert other_process(tmp_path, """
        print(store.try_lock(b"http://a/x"), store.is_locked(b"http://a/x"), store.try_lock(b"http://a/y"))
    """) == ["False", "True", "True"]
    store.unlock(b"http://a/x")
    assert other_process(tmp_path, """
        print(store.is_locked(b"http://a/x"), store.try_lock(b"http://a/x"))
    """) == ["False", "True"]


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    script = ("import sys, time\nfrom bastion.cache.disk_store import DiskStore\n"
              f"store = DiskStore({str(tmp_path)!r}, 1 << 20)\n"
              "print(store.try_lock(b'http://a/x'), flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "True"
        assert store.is_locked(b"http://a/x") is True
        child.send_signal(signal.SIGKILL)  # dies holding it, without unlocking
        child.wait(10)
        assert store.is_locked(b"http://a/x") is False
        assert store.try_lock(b"http://a/x") is True
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()


def test_probing_does_not_take_the_lock(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    assert store.is_locked(b"k") is False
    assert other_process(tmp_path, "print(store.try_lock(b'k'))\n") == ["True"]
    assert 0 <= lock_offset(b"k") < 1 << 62
