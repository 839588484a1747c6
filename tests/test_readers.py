"""Reader leases with real processes: retention in one process skips the checkpoint another process
is reading (and deletes it at a later prune), and leases counted within a process survive the
release of one of two readers of the same iteration."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pma_train.checkpoint import layout, readers
from pma_train.checkpoint.retention import prune
from tests import launch
from tests.launch import REPO

READER = textwrap.dedent("""
    import sys
    from pma_train.checkpoint import readers
    paths = sys.argv[1:]
    with readers.reading(paths), readers.reading(paths[:1]):
        with readers.reading(paths[:1]):
            pass  # a second lease of the same iteration released: the first must still hold
        print("held", flush=True)
        sys.stdin.readline()
""")


def checkpoints(root, iterations):
    for it in iterations:
        (root / layout.iter_dir_name(it)).mkdir(parents=True)
    layout.write_tracker(root, iterations[-1])


def hold(paths):
    proc = subprocess.Popen([sys.executable, "-c", READER, *map(str, paths)], cwd=REPO, env=launch.test_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_retention_skips_what_another_process_reads_and_prunes_it_later(tmp_path, caplog):
    root = tmp_path / "ckpt"
    checkpoints(root, [10, 20, 30, 40])
    reader = hold([root / "iter_0000010", root / "iter_0000030"])
    try:
        assert prune(root, keep_last=1, grid_every=None, grid_last=None) == [20]
        assert layout.list_iterations(root) == [10, 30, 40]
        assert "keeping" in caplog.text and "iter_0000010" in caplog.text and "iter_0000030" in caplog.text
    finally:
        reader.communicate("\n", timeout=60)
    assert reader.returncode == 0
    assert prune(root, keep_last=1, grid_every=None, grid_last=None) == [10, 30]  # the lease is gone with it
    assert layout.list_iterations(root) == [40]


def test_a_lease_in_this_process_is_respected_by_its_own_retention(tmp_path):
    root = tmp_path / "ckpt"
    checkpoints(root, [1, 2, 3])
    with readers.reading([root / "iter_0000001"]):
        assert prune(root, keep_last=1, grid_every=None, grid_last=None) == [2]
    assert prune(root, keep_last=1, grid_every=None, grid_last=None) == [1]
