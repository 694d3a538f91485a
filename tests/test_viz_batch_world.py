"""The batch inspector's world space, slice choice, keys, merged redraws and runtime directory.

Several subjects with different affines (the fixture gives each its own voxel size and origin) must
land in one RAS+ mm space; rendering runs only where a wgpu device exists.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from dwiml_nb.testing import write_dwiml_hdf5
from dwiml_nb import viz_batch
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput
from dwiml_nb.viz_batch import (ALL_SUBJECTS, BatchInspector, CanvasBusy, annotate,
                                batch_parts, densest_slice, make_batch_view, render_view,
                                voxel_to_world)

SUBJECTS = ('sub-01', 'sub-02', 'sub-03')


@pytest.fixture(scope='module')
def truth_and_sampler(tmp_path_factory):
    path = tmp_path_factory.mktemp('world') / 'data.hdf5'
    truth = write_dwiml_hdf5(path, training=SUBJECTS, validation=('sub-04',), testing=('sub-05',), dims=(10, 9, 8),
                             nb_streamlines=(20, 25, 15, 5, 5), seed=11)
    dataset = MultiSubjectDataset(path).load_data(progress=False)
    sampler = BatchStreamlinesSamplerOneInput(dataset.training_set, 'streamlines', 'input', batch_size=60, seed=2)
    return truth, sampler


def test_every_subject_is_drawn_in_ras_mm_through_its_own_affine(truth_and_sampler):
    truth, sampler = truth_and_sampler
    subset = sampler.source_data
    affines = [truth['subjects'][name]['input']['affine'] for name in subset.subjects]   # the streamlines' too
    assert not np.allclose(affines[0], affines[1])                   # the subjects' grids differ
    parts = batch_parts(sampler, 0, 0)
    view = make_batch_view(sampler, parts, stage='stored', color_by='subject')
    stored = sampler.load_batch(parts)  # no augmentation, no resampling in this sampler: the stored points
    assert len(set(stored.subject_ids.tolist())) > 1
    for i in range(len(stored)):
        rows = slice(int(view.streamlines.offsets[i]), int(view.streamlines.offsets[i] + view.streamlines.lengths[i]))
        mine = stored.streamlines[i]
        np.testing.assert_allclose(view.streamlines.data[rows], voxel_to_world(mine, affines[stored.subject_ids[i]]),
                                   atol=1e-4)
    # the key names the subjects shown, in their colours
    names = [label for label, _ in view.legend.items]
    assert names == [subset.subjects[i] for i in np.unique(stored.subject_ids)]


def test_the_slice_is_the_one_most_streamlines_cross_and_sits_in_world_space(truth_and_sampler):
    truth, sampler = truth_and_sampler
    parts = batch_parts(sampler, 0, 0)
    subject = parts[0].subject_index
    for axis in (0, 1, 2):
        view = make_batch_view(sampler, parts, subject=subject, slice_axis=axis, slice_group='wm_mask')
        name = sampler.source_data.subjects[subject]
        np.testing.assert_array_equal(view.slice_affine, truth['subjects'][name]['wm_mask']['affine'])
        test_index = densest_slice(view.streamlines, axis, view.slice_image.shape, view.slice_affine)
        assert view.slice_index == test_index and view.slice_group == 'wm_mask'
        assert f"slice {'xyz'[axis]}={test_index} of wm_mask ({name})" in view.title
        # no other slice is crossed by more streamlines (brute force)
        inv = np.linalg.inv(view.slice_affine)
        counts = np.zeros(view.slice_image.shape[axis], int)
        for s in view.streamlines:
            index = np.floor((s @ inv[:3, :3].T + inv[:3, 3])[:, axis] + 0.5).astype(int)
            index = np.unique(index[(index >= 0) & (index < len(counts))])
            counts[index] += 1
        assert counts[test_index] == counts.max()


@pytest.mark.slow
def test_inspector_picks_the_densest_slice_until_the_user_moves_it(truth_and_sampler):
    _, sampler = truth_and_sampler
    inspector = BatchInspector(sampler, render=False, live=False)
    c = inspector.controls
    assert c['subject'].value == ALL_SUBJECTS and c['subject'].label == 'all subjects'
    assert list(c['slice_group'].options) == ['input', 'wm_mask'] and c['slice_group'].value == 'input'
    inspector._updating = True
    c['slice_axis'].value = 'z'
    inspector._updating = False
    assert inspector.view().slice_index == make_batch_view(sampler, batch_parts(sampler), slice_axis='z').slice_index
    inspector._changed('slice_index')
    c['slice_index'].value = 1
    assert inspector.view().slice_index == 1
    c['slice_axis'].value = 'x'                    # a new axis: back to the densest slice
    assert inspector._auto_slice


def test_a_busy_canvas_is_redrawn_later_with_the_last_request(truth_and_sampler):
    _, sampler = truth_and_sampler
    inspector = BatchInspector(sampler, render=False, live=False)

    class Canvas:
        busy_for, shown = 1, []

        def show(self, view, camera=None, drawing='lines'):
            if self.busy_for:
                self.busy_for -= 1
                raise CanvasBusy('the canvas is drawing a frame')
            self.shown.append(view.title)

        def snapshot(self):
            return np.full((4, 4, 4), 255, np.uint8)

    inspector.canvas = Canvas()
    inspector.refresh()                             # no event loop: a message, no endless retry
    assert 'drawing a frame' in inspector.message.value and not Canvas.shown

    async def in_a_kernel():
        inspector.canvas.busy_for = 1
        inspector.controls['color_by'].value = 'direction'
        inspector.controls['stage'].value = 'before'     # a second change while the first waits
        await asyncio.sleep(0.3)

    asyncio.run(in_a_kernel())
    assert len(Canvas.shown) == 1 and 'colour by direction' in Canvas.shown[0]
    assert 'before augmentation' in Canvas.shown[0] and 'before augmentation' in inspector.message.value


def test_annotate_burns_the_title_and_key_into_the_picture(truth_and_sampler):
    _, sampler = truth_and_sampler
    view = make_batch_view(sampler, batch_parts(sampler), color_by='direction')
    picture = np.full((100, 300, 4), 255, np.uint8)
    burned = annotate(picture, view)
    assert burned.shape[1] == 300 and burned.shape[0] > 100 + 3 * 16
    red = (burned[..., 0] > 240) & (burned[..., 1] < 20) & (burned[..., 2] < 20)
    assert red.sum() > 50                          # the x (R/L) swatch of the orientation key


@pytest.mark.slow
def test_renders_make_their_own_runtime_directory(tmp_path, can_render):
    "wgpu complains on stderr when XDG_RUNTIME_DIR is missing: a render sets up a private one first."
    code = ('import numpy as np\n'
            'from dwiml_nb.core import PackedStreamlines\n'
            'from dwiml_nb.viz_batch import BatchView, render_view\n'
            'lines = PackedStreamlines.from_sequence([np.c_[np.arange(5.), np.zeros(5), np.zeros(5)]])\n'
            'image = render_view(BatchView(lines, np.ones((5, 3), np.float32) * 0.2), size=(60, 60))\n'
            'import os, stat\n'
            'd = os.environ["XDG_RUNTIME_DIR"]\n'
            'assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and (image[..., :3] != 255).any()\n'
            'print("ok", d)\n')
    env = {k: v for k, v in os.environ.items() if k != 'XDG_RUNTIME_DIR'}
    for runtime in (None, str(tmp_path / 'missing')):
        if runtime:
            env['XDG_RUNTIME_DIR'] = runtime
        done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith('ok'), done.stderr
        assert 'XDG_RUNTIME_DIR' not in done.stderr, done.stderr
        assert not os.path.exists(done.stdout.split()[1])      # removed at exit


def test_tubes_and_lines_both_draw(truth_and_sampler, can_render):
    _, sampler = truth_and_sampler
    view = make_batch_view(sampler, batch_parts(sampler), color_by='direction', slice_axis='z')
    lines = render_view(view, size=(120, 120))
    tubes = render_view(view, size=(120, 120), drawing='tubes')
    drawn = lambda image: (image[..., :3] != 255).any(axis=-1).mean()
    assert drawn(lines) > 0.02 and drawn(tubes) > 0.02 and (lines != tubes).any()
    with pytest.raises(viz_batch.ConfigError, match='drawing'):
        render_view(view, size=(20, 20), drawing='ribbons')


# --- any tractogram over a subject's reference (overlay) ---

@pytest.fixture(scope='module')
def phantom_tracked(tmp_path_factory):
    "A demo phantom and a 'tracked' .trk of a validation subject: two of its three bundles, from its reference."
    from dwiml_nb.data import make_demo_dataset
    from dwiml_nb.tracking import TrackingResult, save_tractogram
    root = tmp_path_factory.mktemp('overlay')
    hdf5 = make_demo_dataset(root / 'demo', which='phantom', nb_subjects=3, progress=False).hdf5_files['phantom']
    dataset = MultiSubjectDataset(hdf5).load_data(progress=False)
    subset, subject = dataset.validation_set, dataset.validation_set.subjects[0]
    info = subset.get_streamline_info(0, 'streamlines')
    ids = viz_batch.reference_bundles(subset, 0)
    kept = np.flatnonzero(ids != ids.max())
    tracked = subset.get_streamlines(0, 'streamlines', kept)
    trk = save_tractogram(TrackingResult(tracked, info.affine, tuple(int(n) for n in info.dimensions), {}),
                          root / 'tracked.trk')
    return hdf5, dataset, subject, trk, ids


def _pixels_of(image, rgb, tolerance=6):
    return (np.abs(image[..., :3].astype(int) - np.round(np.asarray(rgb) * 255).astype(int)).max(-1) <= tolerance).sum()


def test_overlay_colours_each_tracked_streamline_by_its_bundle_over_the_faded_reference(phantom_tracked, can_render,
                                                                                        tmp_path):
    hdf5, dataset, subject, trk, ids = phantom_tracked
    png = tmp_path / 'overlay.png'
    image = viz_batch.render_overlay_png(trk, hdf5, subject, png, size=(320, 320), annotated=False)
    assert png.is_file() and image.shape == (320, 320, 4)
    palette = viz_batch.categorical_palette(int(ids.max()) + 1)
    for bundle in np.unique(ids)[:-1]:                       # the tracked bundles, in their colours
        assert _pixels_of(image, palette[bundle]) > 30, bundle
    assert _pixels_of(image, palette[ids.max()]) == 0        # the untracked bundle: only its faded reference
    faded = palette[ids.max()] * (1 - viz_batch.REFERENCE_FADE) + viz_batch.REFERENCE_FADE
    assert _pixels_of(image, faded, tolerance=10) > 10
    # labels given: -1 is 'no bundle', drawn dark grey, and the key says so
    view = viz_batch.overlay_view(trk, dataset, subject, labels=np.full((ids != ids.max()).sum(), -1))
    assert view.legend.items[-1][0].startswith('no bundle') and 'labels given' in view.legend.note
    assert _pixels_of(render_view(view, size=(320, 320)), viz_batch.NO_BUNDLE_COLOR) > 30


def test_overlay_world_space_matches_the_batches(phantom_tracked):
    hdf5, dataset, subject, trk, ids = phantom_tracked
    subset = dataset.validation_set
    info = subset.get_streamline_info(0, 'streamlines')
    view = viz_batch.overlay_view(trk, dataset, subject, name='tracked.trk', slice_axis='y', slice_group='wm_mask')
    stored = subset.get_streamlines(0, 'streamlines', np.flatnonzero(ids != ids.max()))
    np.testing.assert_allclose(view.streamlines.data, voxel_to_world(stored.data, info.affine), atol=1e-3)
    assert len(view.underlay) == len(ids) and view.slice_group == 'wm_mask' and 'tracked.trk' in view.title
    counts = [label for label, _ in view.legend.items]
    assert all(' tracked / ' in label for label in counts) and not any(l.startswith('no bundle') for l in counts)


def test_visualize_batch_draws_a_tractogram_over_its_subject(phantom_tracked, can_render, tmp_path, capsys):
    hdf5, dataset, subject, trk, ids = phantom_tracked
    with pytest.raises(SystemExit) as exc:
        viz_batch.visualize_batch_main([str(hdf5), 'streamlines', '--tractogram', str(trk), '--save',
                                        str(tmp_path / 'x.png')])
    assert exc.value.code == 2 and '--tractogram needs --subject' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        viz_batch.visualize_batch_main([str(hdf5), 'streamlines', '--tractogram', str(trk), '--subject', subject,
                                        '--size', '200', '200', '--save', str(tmp_path / 'overlay.png')])
    assert exc.value.code == 0
    from PIL import Image
    saved = np.asarray(Image.open(tmp_path / 'overlay.png'))
    assert saved.shape[1] == 200 and saved.shape[0] > 240                  # title and key bands
