"""Writing never replaces what is not ours: a target that is not a regular file is refused, and kept."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dwiml_nb.core import DataError, atomic_write

from dwiml_nb.testing import make_toy_trainer  # noqa: E402

BIN = Path(sys.executable).parent


def _fifo(p): os.mkfifo(p)
def _dir(p): p.mkdir()
def _link_to_devnull(p): p.symlink_to('/dev/null')
def _dangling_link(p): p.symlink_to(p.parent / 'nowhere.html')


KINDS = [(_fifo, 'is a FIFO', stat.S_ISFIFO), (_dir, 'is a directory', stat.S_ISDIR),
         (_link_to_devnull, 'is a symbolic link', stat.S_ISLNK), (_dangling_link, 'is a symbolic link', stat.S_ISLNK)]


@pytest.mark.parametrize('make, message, still', KINDS)
def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path, make, message, still):
    target = tmp_path / 'out.html'
    make(target)
    with pytest.raises(DataError, match=f"file '{target}': .*{message}.*refusing to replace it"):
        with atomic_write(target) as tmp:
            tmp.write_text('new')
    assert still(os.lstat(target).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != 'nowhere.html') == ['out.html']   # no temp left
    assert not (tmp_path / 'nowhere.html').exists()


def test_atomic_write_refuses_dev_null():
    with pytest.raises(DataError, match="file '/dev/null': exists and is a device, not a regular file"):
        with atomic_write('/dev/null') as tmp:
            tmp.write_text('new')
    assert stat.S_ISCHR(os.lstat('/dev/null').st_mode)
    assert not any(p.name.startswith('.null.tmp-') for p in Path('/dev').iterdir())


def test_a_regular_file_is_still_replaced(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')
    with atomic_write(target) as tmp:
        tmp.write_text('new')
    assert target.read_text() == 'new'


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp('exps')
    make_toy_trainer(path, 'exp', max_epochs=1).train_and_validate()
    return path / 'exp'


@pytest.mark.parametrize('make, message, still', KINDS[:3])
def test_visualize_logs_save_keeps_what_is_not_a_regular_file(tmp_path, experiment, make, message, still):
    target = tmp_path / 'figure.html'
    make(target)
    run = subprocess.run([BIN / 'dwiml_visualize_logs', experiment, '--save', target], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), run.stderr
    assert f"file '{target}'" in lines[0] and message in lines[0], run.stderr
    assert still(os.lstat(target).st_mode)
    assert stat.S_ISCHR(os.stat('/dev/null').st_mode)
