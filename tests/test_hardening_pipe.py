"""A reader that stops early (`| head -1`) ends a script quietly, without a BrokenPipeError traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from dwiml_nb.testing import write_tiny_hdf5  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def hdf5_file(tmp_path_factory):
    return write_tiny_hdf5(tmp_path_factory.mktemp('data') / 'tiny.hdf5')


@pytest.mark.parametrize('json', [False, True])
def test_describe_into_a_closed_pipe_is_quiet(hdf5_file, json):
    proc = subprocess.Popen([BIN / 'dwiml_describe_hdf5', hdf5_file, *(['--json'] if json else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # the reader is gone before the script writes anything
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert code in (0, 141), err
    assert 'Traceback' not in err and 'BrokenPipeError' not in err and err.strip() == '', err


def test_describe_piped_into_head(hdf5_file):
    run = subprocess.run(['bash', '-c', f'set -o pipefail; "{BIN / "dwiml_describe_hdf5"}" "{hdf5_file}" --json | head -1'],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == '{'
    assert run.returncode in (0, 141), run.stderr
    assert 'Traceback' not in run.stderr and 'BrokenPipeError' not in run.stderr and run.stderr.strip() == ''
