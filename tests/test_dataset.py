"""MultiSubjectDataset on real HDF5 files written in dwi_ml's own layout (dwiml_nb.testing)."""
import gc
import os
import pickle
import shutil
import weakref

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dwiml_nb.core import ConfigError, DataError, PackedStreamlines
from dwiml_nb.dataset import MultiSubjectDataset, MultiSubjectSubset, StreamlineGroupInfo, read_packed_streamlines
from dwiml_nb.testing import read_streamlines_slowly, write_dwiml_hdf5

SETS = ('training', 'validation', 'testing')


@pytest.fixture(scope='module')
def dwiml_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('dwiml') / 'dwiml_layout.hdf5'
    return path, write_dwiml_hdf5(path)


@pytest.fixture(scope='module')
def big_file(tmp_path_factory):
    "More subjects than a cache holds, and groups large enough for scattered reads."
    path = tmp_path_factory.mktemp('big') / 'big.hdf5'
    truth = write_dwiml_hdf5(path, training=('s5', 's1', 's3', 's0'), validation=('s2',), testing=('s4',),
                             nb_streamlines=(1500, 7, 900, 0), seed=3)
    return path, truth


def load(path, lazy, cache_size=2):
    return MultiSubjectDataset(path, lazy=lazy, cache_size=cache_size).load_data(progress=False)


def assert_same_streamlines(got, want):
    assert isinstance(got, PackedStreamlines) and got.data.dtype == np.float32
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.lengths, [len(w) for w in want])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# --- the fixture is dwi_ml's layout, to the attribute ---

def test_fixture_writes_dwi_ml_dtypes(dwiml_file):
    path, _ = dwiml_file
    with h5py.File(path, 'r') as f:
        a = f.attrs
        assert isinstance(a['data_and_time'], str)
        for key in ('chosen_subjs', 'training_subjs', 'validation_subjs', 'testing_subjs'):
            assert a[key].dtype == object and all(isinstance(s, str) for s in a[key])
        assert list(a['chosen_subjs']) != sorted(a['chosen_subjs'])
        assert a['groups_config'].startswith("{'input': {'type': 'volume'")
        assert a['step_size'] == a['nb_points'] == a['compress'] == 'Not defined by user'
        v = f['sub-01/input']
        assert (v.attrs['type'], v.attrs['affine'].dtype, v.attrs['voxres'].dtype) == ('volume', np.float64, np.float32)
        assert v.attrs['nb_features'].dtype == np.int64 and v['data'].dtype == np.float32 and v['data'].chunks is None
        s = f['sub-01/streamlines']
        assert (s.attrs['space'], s.attrs['origin']) == ('Space.VOX', 'Origin.TRACKVIS')
        assert s.attrs['dimensions'].dtype == np.int16 and s.attrs['voxel_sizes'].dtype == np.float32
        assert s['data'].dtype == np.float64 and s['euclidean_lengths'].dtype == np.float64
        assert s['offsets'].dtype == s['lengths'].dtype == np.int64
        assert s['data_per_streamline/weight'].dtype == np.float32 and s['data_per_streamline/weight'].shape[1] == 1


# --- a dwi_ml file loads without conversion and every value comes back right ---

@pytest.mark.parametrize('lazy', [False, True])
def test_dwiml_file_every_value(dwiml_file, lazy):
    path, truth = dwiml_file
    ds = load(path, lazy)
    assert (ds.volume_groups, ds.streamline_groups) == (['input', 'wm_mask'], ['streamlines'])
    assert ds.nb_features == {'input': 4, 'wm_mask': 1}
    assert (ds.step_size, ds.nb_points, ds.compress) == (None, None, None)
    assert ds.groups_config == truth['config']
    for set_name in SETS:
        subset = getattr(ds, f'{set_name}_set')
        assert isinstance(subset, MultiSubjectSubset) and subset.set_name == set_name
        assert subset.subjects == truth[f'{set_name}_subjs'] and len(subset) == len(subset.subjects)
        assert subset.lazy == lazy and subset.hdf5_file == path and subset.nb_features == ds.nb_features
        for i, subj in enumerate(subset.subjects):
            t = truth['subjects'][subj]
            for group in ds.volume_groups:
                vol = subset.get_volume(i, group)
                assert isinstance(vol, torch.Tensor) and vol.dtype == torch.float32 and vol.device.type == 'cpu'
                np.testing.assert_array_equal(vol.numpy(), t[group]['data'])
                affine = subset.get_volume_affine(i, group)
                assert affine.dtype == np.float64 and affine.shape == (4, 4)
                np.testing.assert_array_equal(affine, t[group]['affine'])
            ts = t['streamlines']
            info = subset.get_streamline_info(i, 'streamlines')
            assert isinstance(info, StreamlineGroupInfo)
            np.testing.assert_array_equal(info.lengths, ts['lengths'])
            np.testing.assert_array_equal(info.offsets, ts['offsets'])
            assert info.euclidean_lengths.dtype == np.float64
            np.testing.assert_array_equal(info.euclidean_lengths, ts['euclidean_lengths'])
            np.testing.assert_array_equal(info.affine, ts['attrs']['affine'])
            np.testing.assert_array_equal(info.dimensions, ts['attrs']['dimensions'])
            np.testing.assert_array_equal(info.voxel_sizes, ts['attrs']['voxel_sizes'])
            assert info.voxel_order == 'RAS' and info.dps_keys == ['weight']
            n = subset.nb_streamlines(i, 'streamlines')
            assert n == len(ts['streamlines'])
            assert_same_streamlines(subset.get_streamlines(i, 'streamlines', np.arange(n)),
                                    [s.astype(np.float32) for s in ts['streamlines']])
            ids = np.arange(n)[::-3]
            np.testing.assert_array_equal(subset.get_dps(i, 'streamlines', 'weight', ids), ts['dps']['weight'][ids])
    ds.close()


def test_float32_points_and_defined_resampling(tmp_path):
    path = tmp_path / 'resampled.hdf5'
    truth = write_dwiml_hdf5(path, step_size=0.5, compress=0.2)
    with h5py.File(path, 'r') as f:
        assert f['sub-01/streamlines/data'].dtype == np.float32
    for lazy in (False, True):
        ds = load(path, lazy)
        assert (ds.step_size, ds.nb_points, ds.compress) == (0.5, None, 0.2)
        subset = ds.training_set
        want = truth['subjects']['sub-01']['streamlines']['streamlines']
        assert_same_streamlines(subset.get_streamlines(1, 'streamlines', [3, 0]), [want[3], want[0]])
        ds.close()


# --- lazy and RAM modes agree, and both match a per-streamline h5py read ---

def test_lazy_and_ram_return_the_same_data(big_file):
    path, truth = big_file
    ram, lazy = load(path, False), load(path, True)
    rng = np.random.default_rng(7)
    for set_name in SETS:
        r, z = getattr(ram, f'{set_name}_set'), getattr(lazy, f'{set_name}_set')
        for i, subj in enumerate(r.subjects):
            for group in ram.volume_groups:
                assert torch.equal(r.get_volume(i, group), z.get_volume(i, group))
            n = r.nb_streamlines(i, 'streamlines')
            id_lists = [np.zeros(0, np.int64)]
            if n:
                id_lists += [rng.integers(0, n, k) for k in (1, 5, 50, 300)]  # unsorted, with repeats
                id_lists += [np.array([n - 1, 0, n - 1, 0]), np.arange(n)[::-1],
                             np.sort(rng.choice(n, min(n, 4), replace=False)) * 1]  # thinly scattered
            for ids in id_lists:
                want = read_streamlines_slowly(path, subj, 'streamlines', ids)
                got_ram, got_lazy = r.get_streamlines(i, 'streamlines', ids), z.get_streamlines(i, 'streamlines', ids)
                assert_same_streamlines(got_ram, want)
                assert_same_streamlines(got_lazy, want)
                np.testing.assert_array_equal(got_ram.offsets, got_lazy.offsets)
    # ids may come as a list or a torch tensor
    assert_same_streamlines(lazy.training_set.get_streamlines(0, 'streamlines', torch.tensor([4, 2])),
                            read_streamlines_slowly(path, 's5', 'streamlines', [4, 2]))
    lazy.close()


def test_scattered_ids_are_read_in_few_slices():
    "Reads are contiguous slices: one when the ids are close, a few runs when they are thinly scattered."
    class Recorder:
        def __init__(self, a): self.a, self.reads = a, []
        def __getitem__(self, s):
            assert isinstance(s, slice)  # never fancy indexing
            self.reads.append(s.stop - s.start)
            return self.a[s]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 40, 100_000)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    points = Recorder(np.arange(3 * lengths.sum(), dtype=np.float64).reshape(-1, 3))
    close = rng.integers(1000, 1300, 200)
    read_packed_streamlines(points, offsets, lengths, close)
    assert len(points.reads) == 1
    points.reads.clear()
    scattered = rng.choice(100_000, 64, replace=False)
    got = read_packed_streamlines(points, offsets, lengths, scattered)
    # a hole of unneeded points is skipped (one more read) exactly when it exceeds min_hole
    ordered = np.sort(scattered)
    holes = offsets[ordered[1:]] - (offsets[ordered[:-1]] + lengths[ordered[:-1]])
    assert 1 < len(points.reads) == 1 + sum(h > 1024 for h in holes) < 64
    assert sum(points.reads) == lengths[scattered].sum() + sum(h for h in holes if h <= 1024)
    for g, i in zip(got, scattered):
        np.testing.assert_array_equal(g, points.a[offsets[i]:offsets[i] + lengths[i]].astype(np.float32))


# --- lazy mode: bounded cache, workers, pickling ---

def test_lru_cache_holds_at_most_cache_size_volumes(big_file):
    path, truth = big_file
    subset = load(path, lazy=True, cache_size=2).training_set
    alive = []
    for i in range(len(subset)):
        for group in ('input', 'wm_mask'):
            alive.append(weakref.ref(subset.get_volume(i, group)))
            info = subset.cache_info()
            assert info['size'] <= 2
    assert subset.cache_info()['keys'] == [('s0', 'input'), ('s0', 'wm_mask')]
    gc.collect()
    # evicted volumes are really freed: memory stays bounded
    assert sum(r() is not None for r in alive) == 2
    before = subset.cache_info()
    subset.get_volume(3, 'input')  # a hit: no read, becomes most recent
    after = subset.cache_info()
    assert after['hits'] == before['hits'] + 1 and after['misses'] == before['misses']
    assert after['keys'] == [('s0', 'wm_mask'), ('s0', 'input')]
    np.testing.assert_array_equal(subset.get_volume(0, 'input').numpy(), truth['subjects']['s5']['input']['data'])
    assert subset.cache_info()['keys'] == [('s0', 'input'), ('s5', 'input')]
    no_cache = load(path, lazy=True, cache_size=0).training_set
    no_cache.get_volume(0, 'input')
    assert no_cache.cache_info()['size'] == 0


def read_in_worker(items):
    "collate_fn: read a volume and streamlines of each subject, in the worker."
    subset = torch.utils.data.get_worker_info().dataset
    out = []
    for i in items:
        n = subset.nb_streamlines(i, 'streamlines')
        ids = np.arange(n)[::-7][:20]
        out.append({'pid': os.getpid(), 'subject': i, 'volume': subset.get_volume(i, 'input').clone(),
                    'ids': ids, 'streamlines': subset.get_streamlines(i, 'streamlines', ids),
                    # the handle in use was opened by this worker, not inherited from the parent
                    'own_handle': subset._opener._pid == os.getpid()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_dataloader_workers_read_correct_data(big_file, context):
    path, truth = big_file
    subset = load(path, lazy=True).training_set
    subset.get_volume(0, 'input')  # the parent's handle is open (and its cache filled) before workers start
    subset.get_streamlines(0, 'streamlines', [1])
    nb_workers = 2 if context == 'fork' else 1  # spawn imports torch per worker: keep it to one
    loader = DataLoader(subset, batch_sampler=[[0, 1], [2], [3, 0], [1, 2, 3]], collate_fn=read_in_worker,
                        num_workers=nb_workers, multiprocessing_context=context)
    pids, seen = set(), 0
    for batch in loader:
        for item in batch:
            subj = subset.subjects[item['subject']]
            np.testing.assert_array_equal(item['volume'].numpy(), truth['subjects'][subj]['input']['data'])
            assert_same_streamlines(item['streamlines'], read_streamlines_slowly(path, subj, 'streamlines', item['ids']))
            assert item['own_handle']
            pids.add(item['pid'])
            seen += 1
    assert seen == 8 and os.getpid() not in pids and len(pids) == nb_workers
    # the parent's own handle survived the workers
    assert subset._opener.is_open_here()
    assert_same_streamlines(subset.get_streamlines(1, 'streamlines', [3, 1]),
                            read_streamlines_slowly(path, subset.subjects[1], 'streamlines', [3, 1]))
    subset.close()


def test_pickled_lazy_dataset_has_no_volume_data(tmp_path):
    path = tmp_path / 'volumes.hdf5'
    truth = write_dwiml_hdf5(path, training=('s5', 's1', 's3', 's0'), validation=('s2',), testing=('s4',),
                             dims=(24, 24, 24), nb_streamlines=(30, 0, 12))
    volume_bytes = truth['subjects']['s0']['input']['data'].nbytes
    lazy, ram = load(path, lazy=True), load(path, lazy=False)
    for i in range(len(lazy.training_set)):
        lazy.training_set.get_volume(i, 'input')
        lazy.training_set.get_streamlines(i, 'streamlines', [0] if lazy.training_set.nb_streamlines(i, 'streamlines') else [])
    assert lazy.training_set.cache_info()['size'] == 2
    lazy_bytes, ram_bytes = len(pickle.dumps(lazy)), len(pickle.dumps(ram))
    assert ram_bytes > 6 * volume_bytes  # RAM mode carries every volume...
    assert lazy_bytes < volume_bytes  # ...lazy mode none (only metadata: lengths, offsets, dps)
    clone = pickle.loads(pickle.dumps(lazy.training_set))
    assert clone.cache_info()['size'] == 0
    np.testing.assert_array_equal(clone.get_volume(2, 'wm_mask').numpy(), truth['subjects']['s3']['wm_mask']['data'])
    assert_same_streamlines(clone.get_streamlines(2, 'streamlines', [9, 3]),
                            read_streamlines_slowly(path, 's3', 'streamlines', [9, 3]))
    clone.close(); lazy.close()


# --- mistakes get a clear error ---

def test_wrong_group_or_index_is_a_config_error(dwiml_file):
    path, _ = dwiml_file
    for lazy in (False, True):
        subset = load(path, lazy).training_set
        with pytest.raises(ConfigError, match=r"group 'fod'.*unknown volume group 'fod'; volume groups: \['input', 'wm_mask'\], streamline groups: \['streamlines'\]"):
            subset.get_volume(0, 'fod')
        with pytest.raises(ConfigError, match="unknown streamlines group 'tracts'"):
            subset.get_streamlines(0, 'tracts', [0])
        with pytest.raises(ConfigError, match="'wm_mask' is a volume group, not a streamlines group"):
            subset.get_streamlines(0, 'wm_mask', [0])
        with pytest.raises(ConfigError, match="'wm_mask' is a volume group"):
            subset.get_streamline_info(0, 'wm_mask')
        with pytest.raises(ConfigError, match="'streamlines' is a streamline group, not a volume group"):
            subset.get_volume(0, 'streamlines')
        for bad in (2, -1):
            with pytest.raises(ConfigError, match=f'subject index {bad} is out of range: the training set has 2 subjects'):
                subset.get_volume(bad, 'input')
        with pytest.raises(ConfigError, match='subject index 5 is out of range'):
            subset.get_streamlines(5, 'streamlines', [0])
        with pytest.raises(ConfigError, match=r"subject 'sub-03'.*streamline id -1 is out of range"):
            subset.get_streamlines(0, 'streamlines', [0, -1])
        with pytest.raises(ConfigError, match='1-D array of int'):
            subset.get_streamlines(0, 'streamlines', [0.5])
        with pytest.raises(ConfigError, match=r"no data per streamline 'color'; the group has \['weight'\]"):
            subset.get_dps(0, 'streamlines', 'color', [0])
    with pytest.raises(ConfigError, match='cache_size'):
        MultiSubjectDataset(path, lazy=True, cache_size=-1)


def test_foreign_truncated_or_broken_files_are_data_errors(dwiml_file, tmp_path):
    path, _ = dwiml_file
    foreign = tmp_path / 'foreign.hdf5'
    with h5py.File(foreign, 'w') as f:
        f.create_dataset('x', data=np.arange(10))
    truncated = tmp_path / 'truncated.hdf5'
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    text = tmp_path / 'notes.hdf5'
    text.write_text('not hdf5')
    for bad in (foreign, truncated, text, tmp_path / 'missing.hdf5'):
        with pytest.raises(DataError, match=f"file '{bad}'"):
            load(bad, lazy=True)

    def broken(name, edit):
        out = tmp_path / name
        shutil.copy(path, out)
        with h5py.File(out, 'r+') as f:
            edit(f)
        return out

    def bad_offsets(f):
        offsets = f['sub-01/streamlines/offsets'][()]
        offsets[-1] += 10_000
        del f['sub-01/streamlines/offsets']
        f['sub-01/streamlines/offsets'] = offsets
    with pytest.raises(DataError, match=r"subject 'sub-01', group 'streamlines'.*outside the \d+ stored points"):
        load(broken('offsets.hdf5', bad_offsets), lazy=True)

    def no_group(f): del f['sub-04/wm_mask']
    with pytest.raises(DataError, match=r"subject 'sub-04', group 'wm_mask'.*missing for this subject"):
        load(broken('nogroup.hdf5', no_group), lazy=False)

    def more_features(f):
        del f['sub-02/input']['data']
        f['sub-02/input']['data'] = np.zeros((6, 7, 5, 3), np.float32)
        f['sub-02/input'].attrs['nb_features'] = np.int64(3)
    with pytest.raises(DataError, match=r"group 'input'.*disagree on the number of features"):
        load(broken('features.hdf5', more_features), lazy=True)


def test_repr_lists_subsets_and_counts(dwiml_file):
    path, truth = dwiml_file
    ds = MultiSubjectDataset(path, lazy=True)
    assert 'not loaded' in repr(ds)
    ds.load_data(progress=False)
    text, page = repr(ds), ds._repr_html_()
    assert 'lazy' in text and 'training: 2' in text and "['input', 'wm_mask']" in text
    nb = {s: len(truth['subjects'][s]['streamlines']['streamlines']) for s in truth['chosen_subjs']}
    assert f"<td style=\"text-align:right\">{nb['sub-03'] + nb['sub-01']}</td>" in page  # training streamlines
    for subj in truth['chosen_subjs']:
        assert subj in page
    assert repr(ds.testing_set) == f"MultiSubjectSubset('testing', 1 subjects, lazy, streamlines: {nb['sub-02']} streamlines)"
    ds.close()
