"""dwiml_visualize_logs and the live chart on real experiment folders written by the real trainer."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dwiml_nb.viz_training import ExperimentLogs, LiveTrainingChart, find_chromium, logs_figure, visualize_logs_main
from dwiml_nb.testing import ToyTrainer, make_toy_trainer

CLI = [sys.executable, '-c', 'from dwiml_nb.viz_training import visualize_logs_main; visualize_logs_main()']


@pytest.fixture(scope='module')
def experiments(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('exp')
    for name, lr in (('adam_fast', 3e-2), ('adam_slow', 1e-3)):
        make_toy_trainer(root, name, max_epochs=3, learning_rate=lr, clip_grad=0.5,
                         lr_scheduler={'name': 'StepLR', 'step_size': 1, 'gamma': 0.5}).train_and_validate()
    return root


def _cli(*args, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_html_compares_both_experiments(experiments, tmp_path):
    run = _cli(experiments / 'adam_fast', experiments / 'adam_slow', '--save', tmp_path / 'logs.html', '--smooth', 3)
    assert run.returncode == 0, run.stderr
    page = (tmp_path / 'logs.html').read_text()
    for name in ('adam_fast', 'adam_slow'):
        for kind in ('train loss (per batch)', 'validation loss (epoch)', 'gradient norm after clipping',
                     'learning rate'):
            assert f'{name}: {kind}' in page
    assert 'src="https://cdn.plot.ly' not in page   # plotly.js inline: opens offline


@pytest.mark.slow
def test_png_is_a_picture_of_the_right_size(experiments, tmp_path):
    if find_chromium() is None:
        pytest.skip('Chromium is not installed (Debian: apt-get install chromium): PNG export unavailable')
    run = _cli(experiments / 'adam_fast', experiments / 'adam_slow', '--save', tmp_path / 'logs.png',
               '--save', tmp_path / 'logs.html', '--size', 1000, 700)
    assert run.returncode == 0, run.stderr
    image = np.asarray(Image.open(tmp_path / 'logs.png').convert('RGB')).astype(int)
    assert image.shape == (700, 1000, 3)
    # Both experiments' colours are drawn (plotly's first two trace colours), on a white page.
    for colour in ([0x1f, 0x77, 0xb4], [0xd6, 0x27, 0x28]):
        assert (np.abs(image - colour).sum(axis=-1) < 40).sum() > 300
    assert (image == 255).all(axis=-1).mean() > 0.5
    assert (tmp_path / 'logs.html').exists()


@pytest.mark.slow
def test_png_without_chromium_is_a_clear_error(experiments, tmp_path):
    env = {**os.environ, 'PATH': str(Path(sys.executable).parent)}
    run = _cli(experiments / 'adam_fast', '--save', tmp_path / 'logs.png', env=env)
    assert run.returncode == 2
    assert 'needs Chromium' in run.stderr and 'Traceback' not in run.stderr
    assert not (tmp_path / 'logs.png').exists()


def test_learning_rate_schedule_and_curves_match_the_logs(experiments):
    fig = logs_figure([experiments / 'adam_fast'], smooth=1)
    by_name = {t.name: t for t in fig.data}
    batches = pd.read_csv(experiments / 'adam_fast' / 'logs' / 'batches.csv').query("phase == 'train'")
    np.testing.assert_allclose(by_name['adam_fast: learning rate'].y, batches.learning_rate)
    np.testing.assert_allclose(by_name['adam_fast: train loss (mean of 1 batches)'].y, batches.loss)
    assert sorted(set(np.round(by_name['adam_fast: learning rate'].y, 12))) == [0.0075, 0.015, 0.03]


@pytest.mark.parametrize('case, message', [
    ('no_folder', 'no such experiment folder'),
    ('no_logs', 'no such log file'),
    ('header_only', 'no training batch logged yet'),
    ('not_a_log', 'is not a dwiml_nb trainer log'),
])
def test_bad_experiment_folders_are_one_line_errors(experiments, tmp_path, case, message):
    folder = tmp_path / case
    if case != 'no_folder':
        (folder / 'logs').mkdir(parents=True)
    if case == 'header_only':
        header = (experiments / 'adam_fast' / 'logs' / 'batches.csv').read_text().splitlines()[0]
        (folder / 'logs' / 'batches.csv').write_text(header + '\n')
    if case == 'not_a_log':
        (folder / 'logs' / 'batches.csv').write_text('a,b\n1,2\n')
    run = _cli(experiments / 'adam_fast', folder, '--save', tmp_path / 'out.html')
    assert run.returncode == 2
    assert message in run.stderr and case in run.stderr and 'Traceback' not in run.stderr
    assert not (tmp_path / 'out.html').exists()


def _in_process(capsys, *args):
    "(exit code, stderr) of the console script run in this process (faster than a new interpreter)."
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        visualize_logs_main([*map(str, args)])
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize('case, message', [
    ('text_in_loss', "batches.csv': column 'loss' holds 'oops', not a number (line 4)"),
    ('log_is_a_folder', "batches.csv': is not a regular file"),
    ('epochs_log_is_a_folder', "epochs.csv': is not a regular file"),
])
def test_damaged_logs_name_the_file_and_the_column(experiments, tmp_path, capsys, case, message):
    folder = tmp_path / case
    (folder / 'logs').mkdir(parents=True)
    batches = pd.read_csv(experiments / 'adam_fast' / 'logs' / 'batches.csv')
    if case == 'text_in_loss':
        batches['loss'] = batches['loss'].astype(object)
        batches.loc[2, 'loss'] = 'oops'
    if case == 'log_is_a_folder':
        (folder / 'logs' / 'batches.csv').mkdir()
    else:
        batches.to_csv(folder / 'logs' / 'batches.csv', index=False)
    if case == 'epochs_log_is_a_folder':
        (folder / 'logs' / 'epochs.csv').mkdir()
    code, err = _in_process(capsys, folder, '--save', tmp_path / 'out.html')
    assert code == 2 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert message in err and str(folder) in err, err
    assert not (tmp_path / 'out.html').exists()


def test_the_output_is_checked_before_any_log_is_read(experiments, tmp_path, capsys, read_only_folder):
    "A bad --save is said first, even when the experiment is missing too: nothing is read or drawn for nothing."
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'old.html').write_text('mine')
    read_only = read_only_folder
    try:
        for out, message in [(tmp_path / 'old.html', 'exists; pass --overwrite to replace it'),
                             (tmp_path / 'no' / 'x.html', 'does not exist'),
                             (tmp_path / 'a_file' / 'x.html', 'Not a directory'),
                             (read_only / 'x.html', 'is read-only'),
                             (tmp_path / 'x.svg', 'must end with .html or .png')]:
            code, err = _in_process(capsys, tmp_path / 'missing_experiment', '--save', out)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert message in err and f"file '{out}'" in err and 'missing_experiment' not in err, err
    finally:
        if read_only.is_relative_to(tmp_path): read_only.chmod(0o755)
    assert (tmp_path / 'old.html').read_text() == 'mine'
    code, err = _in_process(capsys, experiments / 'adam_fast', '--save', tmp_path / 'old.html', '--overwrite')
    assert code == 0, err
    assert 'adam_fast: train loss (per batch)' in (tmp_path / 'old.html').read_text()


@pytest.mark.parametrize('args, message', [
    (['--smooth', '0'], 'argument --smooth: must be >= 1'),
    (['--size', '-5', '-5'], 'argument --size: must be >= 16 and <= 4096, got -5'),
    (['--size', '100000', '100'], 'argument --size: must be >= 16 and <= 4096, got 100000'),
    (['--smooth', 'nan'], "argument --smooth: 'nan' is not an integer"),
])
def test_bad_numbers_are_one_line_errors(experiments, tmp_path, capsys, args, message):
    code, err = _in_process(capsys, experiments / 'adam_fast', '--save', tmp_path / 'o.html', *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'o.html').exists()


def test_a_run_killed_mid_line_still_plots(experiments, tmp_path):
    folder = tmp_path / 'killed'
    (folder / 'logs').mkdir(parents=True)
    full = (experiments / 'adam_fast' / 'logs' / 'batches.csv').read_text()
    cut = full[:full.rfind('\n', 0, len(full) - 1) + 25]   # the last row half written
    (folder / 'logs' / 'batches.csv').write_text(cut)
    run = _cli(folder, '--save', tmp_path / 'out.html')
    assert run.returncode == 0, run.stderr
    assert 'last line is incomplete' in run.stderr
    logs = ExperimentLogs.read(folder)
    complete_rows = cut.count('\n') - 1
    assert len(logs.train) == len(pd.read_csv(experiments / 'adam_fast' / 'logs' / 'batches.csv')
                                  .head(complete_rows).query("phase == 'train'"))
    assert len(logs.epochs) == 0   # no epochs.csv yet: the loss panel shows batches only


def test_live_chart_outside_jupyter_costs_nothing_and_follows_a_resume(tmp_path):
    torch.set_num_threads(1)
    chart = LiveTrainingChart()
    make_toy_trainer(tmp_path, 'run', max_epochs=1).train_and_validate()
    resumed = LiveTrainingChart(smooth=2, display=True)
    first = make_toy_trainer(tmp_path, 'other', max_epochs=1)
    first.train_and_validate()
    trainer = ToyTrainer.init_from_checkpoint(type(first.model)(), tmp_path, 'other', first.batch_sampler_training,
                                              first.batch_sampler_validation, new_max_epochs=2, progress=False,
                                              callbacks=[chart, resumed])
    trainer.train_and_validate()
    assert chart.widget is None and chart.trace_lengths() == {}
    # The resumed chart starts from the logs of epoch 0 and adds epoch 1.
    lengths = resumed.trace_lengths()
    train_rows = pd.read_csv(tmp_path / 'other' / 'logs' / 'batches.csv').query("phase == 'train'")
    assert lengths['train loss (per batch)'] == len(train_rows) == 10
    assert lengths['validation loss (epoch)'] == 2
    # Its time axis goes on across the resume (the trainer's elapsed_s).
    t = resumed.logs().train.t.to_numpy()
    assert (np.diff(t) > 0).all()


@pytest.mark.slow
def test_importing_and_the_no_display_callback_do_not_import_plotly(tmp_path):
    code = ('import sys, torch; torch.set_num_threads(1)\n'
            'from dwiml_nb.testing import make_toy_trainer\n'
            'from dwiml_nb.viz_training import LiveTrainingChart\n'
            'chart = LiveTrainingChart()\n'
            'make_toy_trainer(%r, "x", max_epochs=1, callbacks=[chart]).train_and_validate()\n'
            'print(len(chart.logs().train), "plotly" in sys.modules)') % str(tmp_path)
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ['5', 'False']


def _fig_from_html(page):
    "The figure JSON that plotly's write_html put in the page."
    import json
    import re
    call = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"responsive', page, re.S)
    return json.loads(call.group(1)), json.loads(call.group(2))


def test_runs_are_named_by_their_shortest_distinct_path_and_legends_stay_short(experiments, tmp_path):
    import shutil
    for parent in ('a', 'b'):
        shutil.copytree(experiments / 'adam_fast', tmp_path / parent / 'run1')
    shutil.copytree(experiments / 'adam_slow', tmp_path / 'b' / 'run2')
    run = _cli(tmp_path / 'a' / 'run1', tmp_path / 'b' / 'run1', tmp_path / 'b' / 'run2', '--save', tmp_path / 'o.html')
    assert run.returncode == 0, run.stderr
    data, layout = _fig_from_html((tmp_path / 'o.html').read_text())
    runs = [t['name'] for t in data if t.get('showlegend') is not False and t.get('legend') != 'legend2']
    assert runs == ['a/run1', 'b/run1', 'run2']
    styles = [t['name'] for t in data if t.get('legend') == 'legend2']
    assert len(styles) == 5   # one legend entry per run, plus the key of line styles
    assert 'a/run1: validation loss (epoch)' in [t['name'] for t in data]   # hover still names run and curve


def test_angle_and_time_axis(experiments, tmp_path):
    run = _cli(experiments / 'adam_fast', '--save', tmp_path / 'o.html', '--angle', '--x', 'time', '--smooth', 1)
    assert run.returncode == 0, run.stderr
    data, layout = _fig_from_html((tmp_path / 'o.html').read_text())
    batches = pd.read_csv(experiments / 'adam_fast' / 'logs' / 'batches.csv').query("phase == 'train'")
    raw = next(t for t in data if t['name'] == 'adam_fast: train loss (per batch)')
    from dwiml_nb.viz_training import _plain_arrays
    raw = _plain_arrays(dict(raw))
    np.testing.assert_allclose(raw['y'], np.degrees(np.arccos(1 - batches.loss)))
    np.testing.assert_allclose(raw['x'], batches.elapsed_s)
    assert layout['xaxis']['title']['text'] == 'training time (s)'
    assert any(a['text'] == 'angular error (degrees)' for a in layout['annotations'])


def test_every_help_option_has_text_and_default():
    run = _cli('--help')
    assert run.returncode == 0
    options = run.stdout.split('options:')[1]
    # One block per option: from a line starting with '-' to the next one.
    blocks = {m.group(1): ' '.join(m.group(0).split())
              for m in re.finditer(r'^ +(-[-\w]+)(?:, (--[-\w]+))?.*?(?=^ +-|\Z)', options, re.S | re.M)}
    blocks = {k.split(', ')[-1]: v for k, v in blocks.items()}
    expected = {'--save': '[]', '--smooth': '20', '--x': 'epoch', '--angle': 'False', '--log': 'False',
                '--size': '(1400, 800)', '-v': 'False'}
    for option, default in expected.items():
        block = blocks[option]
        assert block.endswith(f'(default: {default})'), block
        assert len(block.split()) > 4, block   # a sentence, not only the option's name


def test_live_chart_after_the_run_is_a_plain_figure_bundle(tmp_path):
    "The chart's end: the widget closed and emptied (nothing big to save), `figure()` for the static output."
    torch.set_num_threads(1)
    chart = LiveTrainingChart(smooth=2, display=True)
    make_toy_trainer(tmp_path, 'run', max_epochs=2, callbacks=[chart]).train_and_validate()
    chart.on_train_end(None)   # a second call does nothing
    assert chart.widget is None
    fig = chart.figure()
    assert [t.name for t in fig.data if t.showlegend is not False and t.legend != 'legend2'] == ['run']
