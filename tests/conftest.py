"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(scope='module')
def can_render():
    "Skip (saying why) where FURY cannot render offscreen (no Vulkan driver)."
    from dwiml_nb.viz_batch import RenderingUnavailable, check_rendering
    try:
        check_rendering()
    except RenderingUnavailable as e:
        pytest.skip(str(e))
