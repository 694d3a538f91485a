"""Fixtures shared by several test modules."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope='module')
def can_render():
    "Skip (saying why) where FURY cannot render offscreen (no Vulkan driver)."
    from dwiml_nb.viz_batch import RenderingUnavailable, check_rendering
    try:
        check_rendering()
    except RenderingUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def read_only_folder(tmp_path):
    "A folder this user cannot write in (root writes everywhere, except where the kernel says no)."
    if os.geteuid() != 0:
        folder = tmp_path / 'ro'
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not os.access('/proc/sys', os.W_OK):
        return Path('/proc/sys')
    pytest.skip('no read-only folder for root here')


# ---- data and trainers from dwiml_nb.testing (the notebooks use the same builders) ----
@pytest.fixture
def dwiml_file(tmp_path):
    "A small HDF5 file written exactly as dwi_ml's builder writes it: ``(path, truth)``."
    from dwiml_nb.testing import write_dwiml_hdf5
    path = tmp_path / 'dwiml.hdf5'
    return path, write_dwiml_hdf5(path)


@pytest.fixture
def tiny_hdf5(tmp_path):
    "A tiny dwi_ml-layout file with one subject per set (`write_tiny_hdf5`)."
    from dwiml_nb.testing import write_tiny_hdf5
    return write_tiny_hdf5(tmp_path / 'tiny.hdf5')


@pytest.fixture
def toy_trainer(tmp_path):
    "A factory: ``toy_trainer(name='exp', **trainer_kwargs)`` -> a `ToyTrainer` whose experiments path is `tmp_path`."
    from dwiml_nb.testing import make_toy_trainer

    def make(experiment_name='exp', **kwargs):
        return make_toy_trainer(tmp_path, experiment_name, **kwargs)
    return make
