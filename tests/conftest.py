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
