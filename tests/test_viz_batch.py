"""The batch inspector on real HDF5 files, real samplers and real offscreen FURY renders.

Rendering needs a wgpu device (Mesa's Vulkan driver here): when the probe says there is none,
the rendering tests are skipped with the probe's message, the others still run.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dwiml_nb.testing import write_dwiml_hdf5
from dwiml_nb import viz_batch
from dwiml_nb.core import DataError
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput
from dwiml_nb.viz_batch import (BatchInspector, RenderingUnavailable, batch_parts, make_batch_view,
                                render_batch_png, render_view, visualize_batch_main, voxel_to_world)

SIZE = (160, 160)
# chosen order is testing, training, validation: sub-03 (training) gets 0 streamlines
NB_STREAMLINES = (30, 0, 40, 12)


@pytest.fixture(scope='module')
def hdf5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('viz') / 'data.hdf5'
    write_dwiml_hdf5(path, dims=(12, 10, 8), nb_streamlines=NB_STREAMLINES, seed=5)
    return path


@pytest.fixture(scope='module')
def sampler(hdf5_file):
    dataset = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    return BatchStreamlinesSamplerOneInput(dataset.training_set, 'streamlines', 'input', batch_size=40, step_size=0.5,
                                           split_ratio=0.5, reverse_ratio=0.5, noise_gaussian_size=0.1, seed=7)


@pytest.fixture
def no_gpu(monkeypatch):
    "A probe that crashes, as wgpu would without a driver; the real answer comes back afterwards."
    saved = dict(viz_batch._probe_state)
    viz_batch._probe_state.clear()
    monkeypatch.setattr(viz_batch, '_PROBE_CODE', 'import os; os.abort()')
    yield
    viz_batch._probe_state.clear()
    viz_batch._probe_state.update(saved)


def foreground(image, background=255):
    "Mask of the pixels that are not the white background."
    return (np.asarray(image)[..., :3] != background).any(axis=-1)


def test_before_and_after_show_the_same_streamlines(sampler):
    parts = batch_parts(sampler, 0, 0)
    before = make_batch_view(sampler, parts, stage='before')
    after = make_batch_view(sampler, parts, stage='after', color_by='augmentation')
    both = make_batch_view(sampler, parts, stage='both')
    loaded = sampler.load_batch(parts)
    assert len(after.streamlines) == len(loaded) > len(before.streamlines)    # split ratio 0.5
    # drawn in RAS+ mm (one subject has streamlines in this batch: one affine)
    (subject,) = set(loaded.subject_ids.tolist())
    affine = sampler.source_data.get_streamline_info(subject, 'streamlines').affine
    np.testing.assert_allclose(after.streamlines.data, voxel_to_world(loaded.streamlines.data, affine), atol=1e-4)
    np.testing.assert_array_equal(both.underlay.data, before.streamlines.data)
    # every augmented streamline comes from one shown before, and the before view is not augmented
    plain = sampler.__class__(sampler.source_data, 'streamlines', 'input', batch_size=40, step_size=0.5, seed=7)
    np.testing.assert_allclose(before.streamlines.data, voxel_to_world(plain.load_batch(parts).streamlines.data, affine),
                               atol=1e-4)
    assert set(loaded.streamline_ids) == set(plain.load_batch(parts).streamline_ids)


class RecordingSampler(BatchStreamlinesSamplerOneInput):
    """The test sampler, with an augmentation record made up from its batch when the sampler keeps none.

    Once `dwiml_nb.sampler` records what its transforms did, the real record is used as it is.
    """
    def load_batch(self, parts):
        batch = super().load_batch(parts)
        if getattr(batch, 'augmentation', None):
            return batch
        ids = batch.subject_ids * (1 << 40) + batch.streamline_ids
        second = np.r_[False, ids[1:] == ids[:-1]]                    # halves of a split streamline follow each other
        first = np.r_[second[1:], False]
        rng = np.random.default_rng(len(batch))
        batch.augmentation = {'split': (first + 2 * second).astype(np.int8), 'reversed': rng.random(len(batch)) < 0.5,
                              'noise_mm': rng.uniform(0, 0.3, len(batch)).astype(np.float32)}
        return batch


def test_augmentation_and_noise_colours_follow_the_record(sampler):
    recording = RecordingSampler(sampler.source_data, **sampler.get_params())
    parts = batch_parts(recording, 0, 0)
    after = recording.load_batch(parts)
    codes = viz_batch.augmentation_codes(after)
    assert (codes & 1).any() and (codes & 2).any() and (codes == 0).any()
    view = make_batch_view(recording, parts, color_by='augmentation')
    np.testing.assert_array_equal(view.colors, np.repeat(viz_batch.AUGMENTATION_COLORS[codes], after.streamlines.lengths, 0))
    assert [label for label, _ in view.legend.items] == list(viz_batch.AUGMENTATION_LABELS)
    # before augmentation, a streamline shows everything done to its pieces (split in two, one half reversed)
    before = make_batch_view(recording, parts, stage='before', color_by='augmentation')
    plain = recording.__class__(sampler.source_data, 'streamlines', 'input', batch_size=40, step_size=0.5, seed=7)
    plain_batch = plain.load_batch(parts)
    per_source = np.zeros(len(plain_batch), np.int64)
    for code, sid in zip(codes, after.streamline_ids):
        per_source[plain_batch.streamline_ids == sid] |= code
    np.testing.assert_array_equal(before.colors, np.repeat(viz_batch.AUGMENTATION_COLORS[per_source],
                                                           plain_batch.streamlines.lengths, 0))
    noise = make_batch_view(recording, parts, color_by='noise')
    high = float(after.augmentation['noise_mm'].max())
    assert noise.legend.ramp == (0.0, high) and 'colour by noise' in noise.title
    loudest = int(np.argmax(after.augmentation['noise_mm']))
    start = int(after.streamlines.offsets[loudest])
    np.testing.assert_allclose(noise.colors[start], viz_batch.colormap([1.0])[0])


class SilentSampler(BatchStreamlinesSamplerOneInput):
    "The test sampler with no augmentation record (as a sampler that does not keep one)."
    def load_batch(self, parts):
        batch = super().load_batch(parts)
        batch.augmentation = {}
        return batch


def test_a_batch_without_record_says_so_instead_of_guessing(sampler):
    silent = SilentSampler(sampler.source_data, **sampler.get_params())
    parts = batch_parts(silent, 0, 0)
    for color_by in ('augmentation', 'noise'):
        view = make_batch_view(silent, parts, color_by=color_by)
        assert view.legend.note == viz_batch.NO_RECORD and view.legend.items == [] and view.legend.ramp is None
        assert (view.colors == viz_batch.NO_DIRECTION_GREY).all()


@pytest.mark.slow
def test_render_to_png_is_not_blank_and_follows_colouring_and_augmentation(sampler, can_render, tmp_path):
    png = tmp_path / 'out' / 'batch.png'
    after = render_batch_png(sampler, png, size=SIZE, color_by='streamline', annotated=False)
    saved = np.asarray(Image.open(png))
    np.testing.assert_array_equal(saved, after)
    assert saved.shape == (SIZE[1], SIZE[0], 4)
    drawn = foreground(after)
    assert 0.01 < drawn.mean() < 0.9                                  # something drawn, not a flat fill
    assert len(np.unique(after[drawn][:, :3], axis=0)) > 20           # many streamline colours
    direction = render_batch_png(sampler, tmp_path / 'direction.png', size=SIZE, color_by='direction', annotated=False)
    before = render_batch_png(sampler, tmp_path / 'before.png', size=SIZE, color_by='streamline', stage='before',
                              annotated=False)
    assert foreground(direction).mean() > 0.01 and foreground(before).mean() > 0.01
    # colouring changes the colours of the same shapes; augmentation off changes the shapes
    assert np.abs(direction.astype(int) - after.astype(int)).sum(axis=-1).astype(bool).mean() > 0.01
    assert (foreground(before) != drawn).mean() > 0.005
    assert not list(tmp_path.glob('out/.batch.png.tmp-*'))          # written atomically
    annotated = render_batch_png(sampler, tmp_path / 'annotated.png', size=SIZE, color_by='feature')
    assert annotated.shape[1] == SIZE[0] and annotated.shape[0] > SIZE[1] + 40    # title above, colour bar below


def test_slice_is_drawn_under_the_streamlines(sampler, can_render):
    parts = batch_parts(sampler, 0, 0)
    plain = render_view(make_batch_view(sampler, parts), size=SIZE)
    sliced = render_view(make_batch_view(sampler, parts, slice_axis='z', slice_index=3), size=SIZE)
    assert foreground(sliced).mean() > foreground(plain).mean() + 0.03


def test_inspector_widget_updates_and_reports_problems(hdf5_file, can_render):
    dataset = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    inspector = BatchInspector(dataset=dataset, streamline_group='streamlines', input_group='input', size=SIZE,
                               batch_size=40, step_size=0.5, split_ratio=0.5, seed=7)
    first = inspector.image.value
    assert first[:8] == b'\x89PNG\r\n\x1a\n' and 'training set' in inspector.message.value
    inspector.controls['color_by'].value = 'direction'
    assert inspector.image.value != first
    # sub-03 has no streamlines: a message naming it, no exception, the picture is kept
    empty = dataset.training_set.subjects.index('sub-03')
    shown = inspector.image.value
    inspector.controls['subject'].value = empty
    assert "subject 'sub-03'" in inspector.message.value and 'has no streamlines' in inspector.message.value
    assert inspector.image.value == shown
    inspector.controls['subset'].value = 'validation'
    assert 'validation set' in inspector.message.value
    epoch = inspector.epoch
    inspector.controls['new_draw'].click()
    assert inspector.epoch == epoch + 1 and 'epoch 1' in inspector.message.value


def test_no_gpu_driver_gives_a_message_not_a_crash(sampler, no_gpu, tmp_path):
    view = make_batch_view(sampler, batch_parts(sampler, 0, 0))
    with pytest.raises(RenderingUnavailable, match='crashed.*mesa-vulkan-drivers'):
        render_view(view, size=SIZE)
    inspector = BatchInspector(sampler, size=SIZE)
    assert 'not available' in inspector.message.value and inspector.image.value == b''
    with pytest.raises(SystemExit) as exit_:
        visualize_batch_main([str(sampler.source_data.hdf5_file), 'streamlines', '--save', str(tmp_path / 'x.png')])
    assert exit_.value.code == 2 and not (tmp_path / 'x.png').exists()


def test_console_script_renders_and_refuses_bad_input(hdf5_file, can_render, tmp_path, capsys):
    out = tmp_path / 'batch.png'
    with pytest.raises(SystemExit) as exit_:
        visualize_batch_main([str(hdf5_file), 'streamlines', '--input_group', 'input', '--batch_size', '20',
                              '--seed', '3', '--color_by', 'feature', '--feature', '2', '--slice', 'z',
                              '--step_size', '0.5', '--size', '120', '100', '--save', str(out)])
    assert exit_.value.code == 0
    image = np.asarray(Image.open(out))
    # the 120x100 picture, with the title above and the colour bar below burned in
    assert image.shape[1] == 120 and image.shape[0] > 100 + 40 and foreground(image).mean() > 0.01
    bare = tmp_path / 'bare.png'
    with pytest.raises(SystemExit) as exit_:
        visualize_batch_main([str(hdf5_file), 'streamlines', '--batch_size', '20', '--slice', 'y', '--drawing', 'tubes',
                              '--no_annotation', '--size', '120', '100', '--save', str(bare)])
    assert exit_.value.code == 0                 # the slice of the first volume group, without --input_group
    assert np.asarray(Image.open(bare)).shape == (100, 120, 4)
    capsys.readouterr()
    for argv, message in [
            (['--subject', 'sub-03'], "subject 'sub-03', group 'streamlines'"),
            (['--color_by', 'feature'], 'needs a sampler with an input group'),
            (['--batch_index', '99'], 'outside epoch 0'),
            (['--slice', 'z', '--slice_group', 'streamlines'], "'streamlines' is a streamline group")]:
        with pytest.raises(SystemExit) as exit_:
            visualize_batch_main([str(hdf5_file), 'streamlines', '--save', str(tmp_path / 'bad.png'), *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and 'Traceback' not in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'bad.png').exists()


def _run(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        visualize_batch_main([*map(str, argv)])
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--size', '-5', '-5'], 'argument --size: must be >= 16 and <= 4096, got -5'),
    (['--size', '100000', '100000'], 'argument --size: must be >= 16 and <= 4096, got 100000'),
    (['--step_size', 'inf'], "argument --step_size: 'inf' is not a finite number"),
    (['--step_size', 'nan'], "argument --step_size: 'nan' is not a finite number"),
    (['--step_size', '1e-9'], 'argument --step_size: must be >= 0.01'),
    (['--split_ratio', '2'], 'argument --split_ratio: must be >= 0 and <= 1'),
    (['--reverse_ratio', '-0.1'], 'argument --reverse_ratio: must be >= 0 and <= 1'),
    (['--epoch', '-1'], 'argument --epoch: must be >= 0'),
    (['--batch_index', '-1'], 'argument --batch_index: must be >= 0'),
    (['--batch_size', '0'], 'argument --batch_size: must be >= 1'),
    (['--zoom', '0'], 'argument --zoom: must be >= 0.01'),
    (['--noise_gaussian_size', '-1'], 'argument --noise_gaussian_size: must be >= 0'),
    (['--elevation', '91'], 'argument --elevation: must be >= -90 and <= 90'),
    (['--seed', '-1'], 'argument --seed: must be >= 0'),
    (['--feature', '-2'], 'argument --feature: must be >= 0'),
])
def test_bad_numbers_are_one_line_errors(hdf5_file, tmp_path, capsys, args, message):
    code, err = _run(capsys, hdf5_file, 'streamlines', '--save', tmp_path / 'x.png', *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: dwiml_visualize_batch: ') and not (tmp_path / 'x.png').exists()


def test_the_output_is_checked_before_the_file_is_read(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'old.png').write_bytes(b'mine')
    os.mkfifo(tmp_path / 'fifo.png')
    for out, flags, message in [(tmp_path / 'old.png', [], 'exists; pass --overwrite to replace it'),
                                (tmp_path / 'no' / 'x.png', [], 'does not exist'),
                                (tmp_path / 'a_file' / 'x.png', [], 'Not a directory'),
                                (tmp_path / 'fifo.png', ['--overwrite'], 'is a FIFO'),
                                ('/dev/null', ['--overwrite'], 'is a device'),
                                (tmp_path / 'x.jpg', [], 'must end with .png')]:
        code, err = _run(capsys, tmp_path / 'missing.hdf5', 'streamlines', '--save', out, *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err and f"file '{out}'" in err and 'missing.hdf5' not in err, err
    assert (tmp_path / 'old.png').read_bytes() == b'mine'


def test_overwrite_replaces_an_existing_picture(hdf5_file, can_render, tmp_path, capsys):
    out = tmp_path / 'batch.png'
    out.write_bytes(b'mine')
    code, err = _run(capsys, hdf5_file, 'streamlines', '--batch_size', '20', '--size', '64', '64', '--save', out,
                     '--overwrite')
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape[1] == 64


def test_a_subject_without_streamlines_is_named(sampler):
    empty = sampler.source_data.subjects.index('sub-03')
    with pytest.raises(DataError, match="subject 'sub-03', group 'streamlines'.*has no streamlines in this group"):
        make_batch_view(sampler, batch_parts(sampler, 0, 0), subject=empty)


LIVE_NOTEBOOK_CODE = '''
import json, logging
import numpy as np
from jupyter_rfb import RemoteFrameBuffer
from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.viz_batch import BatchInspector, in_jupyter_kernel

demo = make_demo_dataset(OUT + '/demo', which='phantom', nb_subjects=3, progress=False)
dataset = MultiSubjectDataset(demo.hdf5_files['phantom']).load_data(progress=False)
kwargs = dict(dataset=dataset, streamline_group='streamlines', input_group='input', size=(200, 200), batch_size=40,
              step_size=2.0, seed=3)
inspector = BatchInspector(live=True, **kwargs)
by_streamline = inspector.canvas.snapshot()
inspector.controls['color_by'].value = 'direction'
by_direction = inspector.canvas.snapshot()
inspector.controls['slice_axis'].value = 'z'
sliced = inspector.canvas.snapshot()
np.savez(OUT + '/frames.npz', by_streamline=by_streamline, by_direction=by_direction, sliced=sliced)
auto = BatchInspector(render=False, **kwargs)
json.dump(dict(in_kernel=in_jupyter_kernel(), picture_is_rfb=isinstance(inspector.picture, RemoteFrameBuffer),
               picture_in_widget=inspector.picture in inspector.widget.children[1].children,
               message=inspector.message.value, auto_is_live=auto.canvas is not None,
               last_frame_png=inspector.image.value[:4] == b'\\x89PNG', fallback_class=inspector.fallback_class,
               hide_rule=inspector._hide_fallback.value),
          open(OUT + '/result.json', 'w'))
inspector
'''

LATER_CHANGE_CODE = '''
import time
time.sleep(inspector.FALLBACK_INTERVAL + 0.2)
inspector.controls['color_by'].value = 'subject'
'''


@pytest.mark.slow
def test_live_canvas_in_a_real_kernel_draws_and_follows_the_controls(can_render, tmp_path):
    "In a Jupyter kernel (papermill), the inspector shows FURY's jupyter_rfb canvas, rendered in the kernel."
    pytest.importorskip('jupyter_rfb')
    import json
    import nbformat
    import papermill as pm
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f'OUT = {str(tmp_path)!r}'), nbformat.v4.new_code_cell(LIVE_NOTEBOOK_CODE),
                nbformat.v4.new_code_cell(LATER_CHANGE_CODE)]
    nbformat.write(nb, tmp_path / 'live.ipynb')
    pm.execute_notebook(str(tmp_path / 'live.ipynb'), str(tmp_path / 'out.ipynb'), kernel_name='python3',
                        cwd=str(tmp_path), progress_bar=False)
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result == dict(in_kernel=True, picture_is_rfb=True, picture_in_widget=True, message=result['message'],
                          auto_is_live=True, last_frame_png=True, fallback_class=result['fallback_class'],
                          hide_rule=result['hide_rule']), result
    assert 'training set' in result['message'], result['message']
    frames = np.load(tmp_path / 'frames.npz')
    first, direction, sliced = frames['by_streamline'], frames['by_direction'], frames['sliced']
    assert first.shape == (200, 200, 4)
    assert 0.01 < foreground(first).mean() < 0.9 and len(np.unique(first[foreground(first)][:, :3], axis=0)) > 20
    # the colouring changes the colours of the same shapes (the camera is kept)
    assert np.abs(direction.astype(int) - first.astype(int)).sum(axis=-1).astype(bool).mean() > 0.01
    assert abs(foreground(direction).mean() - foreground(first).mean()) < 0.02
    assert foreground(sliced).mean() > foreground(direction).mean() + 0.05
    # the inspector cell: the widget (jupyter_rfb's output area inside it), then the last frame for saved notebooks
    import base64
    import io
    cell = nbformat.read(tmp_path / 'out.ipynb', as_version=4).cells[1]
    shown = [o for o in cell.outputs if o.output_type == 'display_data']
    assert len(shown) == 2 and 'application/vnd.jupyter.widget-view+json' in shown[0].data, cell.outputs
    html = shown[1].data['text/html']
    assert f'class="{result["fallback_class"]}"' in html and 'colour by subject' in html   # updated by the next cell
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown[1].data['image/png']))))
    assert picture.shape[1] == 200 and picture.shape[0] > 200 and foreground(picture).mean() > 0.01
    assert f'.{result["fallback_class"]}{{display:none}}' in result['hide_rule']


def test_live_auto_outside_a_kernel_falls_back_to_the_snapshot_and_says_why(sampler, caplog):
    with caplog.at_level('INFO', logger='dwiml_nb.viz_batch'):
        inspector = BatchInspector(sampler, size=SIZE, render=False)
    assert inspector.canvas is None and inspector.picture is inspector.image
    assert 'not running in a Jupyter kernel' in caplog.text
    with caplog.at_level('INFO', logger='dwiml_nb.viz_batch'):
        BatchInspector(sampler, size=SIZE, render=False, live=False)
    assert 'live=False was asked' in caplog.text
