"""Hardening of the HDF5 reader: fingerprint of a lazily read file, full validation, checksums.

Every case is a real HDF5 file written in a tmp dir (h5py), read through the public API.
"""
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dwiml_nb.core import DataError
from dwiml_nb.dataset import MultiSubjectDataset, hdf5_fingerprint
from dwiml_nb.testing import write_dwiml_hdf5


def load(path, lazy):
    return MultiSubjectDataset(path, lazy=lazy).load_data(progress=False)


def rebuild(path, seed, **kwargs):
    "Write another file and rename it over `path`, as the builder's atomic write does."
    tmp = path.with_name(f'.{path.name}.tmp')
    write_dwiml_hdf5(tmp, seed=seed, **kwargs)
    os.replace(tmp, path)


# --- A. fingerprint: a lazy reader refuses a file rebuilt since load ---

def test_fingerprint_is_stable_and_changes_with_content(tmp_path, dwiml_file):
    path, _ = dwiml_file
    fp = hdf5_fingerprint(path)
    assert fp == hdf5_fingerprint(path) and len(fp) == 16
    with h5py.File(path, 'r+') as f:  # one value in the middle of a volume's first slab
        f['sub-01/input/data'][0, 0, 0, 0] += 1
    assert hdf5_fingerprint(path) != fp
    fp = hdf5_fingerprint(path)
    rebuild(path, seed=0, training=('sub-03',), validation=('sub-04', 'sub-01'))  # other subject lists
    assert hdf5_fingerprint(path) != fp
    with pytest.raises(DataError, match='not_there'):
        hdf5_fingerprint(tmp_path / 'not_there.hdf5')


@pytest.mark.parametrize('lazy', [False, True])
def test_dataset_keeps_the_fingerprint(tmp_path, lazy, dwiml_file):
    path, _ = dwiml_file
    ds = load(path, lazy)
    assert ds.fingerprint == hdf5_fingerprint(path)
    ds.close()


def test_reopen_after_rebuild_is_refused(tmp_path, dwiml_file):
    path, _ = dwiml_file
    subset = load(path, lazy=True).training_set
    subset.get_streamlines(0, 'streamlines', [0])
    rebuild(path, seed=5)
    subset._opener._pid = -1  # as a forked worker sees the inherited opener
    with pytest.raises(DataError, match=r'changed since the dataset was loaded \(rebuilt\?\)') as e:
        subset.get_streamlines(0, 'streamlines', [0])
    assert str(path) in str(e.value)
    subset.close()


def test_forked_child_refuses_a_rebuilt_file(tmp_path, dwiml_file):
    path, _ = dwiml_file
    subset = load(path, lazy=True).training_set
    subset.get_volume(0, 'input')  # the parent's handle is open
    rebuild(path, seed=6)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: what a DataLoader worker does
        try:
            subset.get_streamlines(0, 'streamlines', [0])
            message = b'read'
        except DataError as e:
            message = str(e).encode()
        except BaseException as e:  # noqa: BLE001 - report anything
            message = repr(e).encode()
        os.write(write, message[:4000])
        os._exit(0)
    os.close(write)
    message = os.read(read, 4000).decode()
    os.waitpid(pid, 0)
    assert 'changed since the dataset was loaded (rebuilt?)' in message and str(path) in message
    subset.close()


def read_one(items):
    subset = torch.utils.data.get_worker_info().dataset
    return [subset.get_streamlines(i, 'streamlines', [0]) for i in items]


def test_dataloader_workers_refuse_a_rebuilt_file(tmp_path, dwiml_file):
    path, _ = dwiml_file
    subset = load(path, lazy=True).training_set
    loader = DataLoader(subset, batch_sampler=[[0], [1]], collate_fn=read_one, num_workers=2,
                        multiprocessing_context='fork')
    assert len(list(loader)) == 2  # unchanged file: workers read it
    rebuild(path, seed=7)
    with pytest.raises(Exception, match=r'changed since the dataset was loaded \(rebuilt\?\)'):
        list(loader)
    subset.close()


# --- C. checksums: files we build carry fletcher32; a flipped byte in raw data is refused ---

@pytest.fixture(scope='module')
def built(tmp_path_factory):
    from dwiml_nb.hdf5 import create_hdf5_dataset
    from dwiml_nb.testing import make_database
    root = tmp_path_factory.mktemp('built')
    db = make_database(root / 'db', subjects=('sub-01', 'sub-02'), nb_streamlines=(30, 20))
    out = root / 'built.hdf5'
    create_hdf5_dataset(db['root'], out, db['config'], ['sub-01'], ['sub-02'], [], progress=False)
    return out


def flip_in_chunk(src, dst, dataset):
    "Copy `src` to `dst` with one byte flipped in the middle of `dataset`'s first chunk of raw data."
    with h5py.File(src, 'r') as f:
        info = f[dataset].id.get_chunk_info(0)
    raw = bytearray(src.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x10
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.slow
def test_built_datasets_carry_checksums_and_plain_h5py_reads_them(built):
    with h5py.File(built, 'r') as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.size else None)
        assert names and all(f[n].fletcher32 and f[n].chunks for n in names)
        points = f['sub-01/streamlines/data'][()]  # plain h5py, no plugin needed
        assert points.shape[1] == 3 and np.isfinite(points).all()
    ds = load(built, lazy=True)
    np.testing.assert_array_equal(ds.training_set.get_streamlines(0, 'streamlines', np.arange(3)).data,
                                  points[:ds.training_set.get_streamline_info(0, 'streamlines').offsets[3]].astype(np.float32))
    ds.close()


@pytest.mark.parametrize('dataset', ['sub-01/streamlines/data', 'sub-01/input/data', 'sub-02/streamlines/lengths'])
@pytest.mark.parametrize('lazy', [False, True])
def test_flipped_byte_in_raw_data_is_a_data_error_naming_the_dataset(built, tmp_path, dataset, lazy):
    bad = flip_in_chunk(built, tmp_path / 'flipped.hdf5', dataset)
    with h5py.File(bad, 'r') as f, pytest.raises(OSError, match='filter returned failure'):
        f[dataset][()]
    subject, group = dataset.split('/')[:2]
    with pytest.raises(DataError) as e:
        ds = load(bad, lazy)
        for subset in ds.subsets.values():  # lazy mode may only find it when reading
            for i in range(len(subset)):
                subset.get_volume(i, 'input')
                subset.get_streamlines(i, 'streamlines', np.arange(subset.nb_streamlines(i, 'streamlines')))
    message = str(e.value)
    assert f"dataset '/{dataset}' cannot be read" in message and 'checksum' in message
    assert f"subject '{subject}'" in message and f"group '{group}'" in message and str(bad) in message


# --- B. a whole file is validated before use; each failure names file, subject and group ---

VLEN = h5py.string_dtype()


def replace(group, name, data, **kwargs):
    del group[name]
    group.create_dataset(name, data=data, **kwargs)


def external_raw(f):
    g = f['sub-01/input']
    shape, raw = g['data'].shape, g['data'][()].astype('<f8')
    outside = f.filename + '.raw'
    with open(outside, 'wb') as out: out.write(raw.tobytes())
    del g['data']
    g.create_dataset('data', shape=shape, dtype='<f8', external=[(outside, 0, raw.nbytes)])


def virtual(f):
    g = f['sub-01/input']
    shape, dtype = g['data'].shape, g['data'].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[...] = h5py.VirtualSource(f.filename + '.other', 'data', shape=shape)
    del g['data']
    g.create_virtual_dataset('data', layout)


def set_attr(name, key, value):
    def edit(f): f[name].attrs[key] = value
    return edit


# case -> (edit of a valid file, regex of the message, subject, group)
CASES = {
    'affine_is_str': (set_attr('sub-01/streamlines', 'affine', 'eye(4)'),
                      r"attribute 'affine' is a str \('eye\(4\)'\); expected a 4×4 array of numbers", 'sub-01', 'streamlines'),
    'affine_wrong_shape': (set_attr('sub-01/input', 'affine', np.eye(3)),
                           r"attribute 'affine' is a float64 array of shape \(3, 3\); expected a 4×4", 'sub-01', 'input'),
    'dimensions_are_floats': (set_attr('sub-04/streamlines', 'dimensions', np.array([6.5, 7, 5])),
                              r"attribute 'dimensions' is a float64 array of shape \(3,\); expected 3 integers", 'sub-04', 'streamlines'),
    'nb_features_is_str': (set_attr('sub-02/input', 'nb_features', 'four'),
                           r"attribute 'nb_features' is a str \('four'\); expected an integer", 'sub-02', 'input'),
    'voxel_order_is_number': (set_attr('sub-01/streamlines', 'voxel_order', 3),
                              r"attribute 'voxel_order' is a int64 scalar; expected a str", 'sub-01', 'streamlines'),
    'offsets_are_floats': (lambda f: replace(f['sub-01/streamlines'], 'offsets', f['sub-01/streamlines/offsets'][()].astype(float)),
                           r"dataset 'offsets' is a float64 array of shape \(\d+,\); expected a 1-D array of integers", 'sub-01', 'streamlines'),
    'lengths_overflow_int64': (lambda f: f['sub-01/streamlines/lengths'].__setitem__(0, 2 ** 63 - 1),
                               r"dataset 'lengths' holds .*expected integers in \[0, 2\*\*62\)", 'sub-01', 'streamlines'),
    'offsets_uint64_huge': (lambda f: replace(f['sub-03/streamlines'], 'offsets',
                                              np.full(f['sub-03/streamlines/offsets'].shape, 2 ** 64 - 5, np.uint64)),
                            r"dataset 'offsets' holds .*expected integers", 'sub-03', 'streamlines'),
    'negative_offset': (lambda f: f['sub-01/streamlines/offsets'].__setitem__(3, -1),
                        r"dataset 'offsets' holds -1\.\.", 'sub-01', 'streamlines'),
    'offset_past_the_points': (lambda f: f['sub-01/streamlines/offsets'].__setitem__(3, 10 ** 6),
                               r'offsets/lengths point outside the \d+ stored points \(first: streamline #3', 'sub-01', 'streamlines'),
    'points_not_3d': (lambda f: replace(f['sub-01/streamlines'], 'data', np.zeros((10, 2))),
                      r"dataset 'data' has shape \(10, 2\); expected \(N_points, 3\)", 'sub-01', 'streamlines'),
    'complex_volume': (lambda f: replace(f['sub-01/input'], 'data', f['sub-01/input/data'][()].astype(np.complex64)),
                       r"dataset 'data' is a complex64 array .*expected a 3-D or 4-D array of real numbers", 'sub-01', 'input'),
    'external_link': (lambda f: f['sub-01'].__setitem__('extra', h5py.ExternalLink('/etc/other.h5', '/x')),
                      r"object '/sub-01/extra' is an external link to '/etc/other.h5:/x'", 'sub-01', 'extra'),
    'soft_link_group': (lambda f: f['sub-02'].__setitem__('alias', h5py.SoftLink('/sub-01/input')),
                        r"object '/sub-02/alias' is a soft link to '/sub-01/input'", 'sub-02', 'alias'),
    'external_raw_storage': (external_raw, r"object '/sub-01/input/data' stores its raw data in external file", 'sub-01', 'input'),
    'virtual_dataset': (virtual, r"object '/sub-01/input/data' is a virtual dataset", 'sub-01', 'input'),
    'named_datatype': (lambda f: f['sub-01'].__setitem__('dtype', np.dtype('<f4')),
                       r"object '/sub-01/dtype' is a Datatype; expected only groups and datasets", 'sub-01', 'dtype'),
    'subject_soft_alias': (lambda f: (f.__setitem__('sub-09', h5py.SoftLink('/sub-01')),
                                      f.attrs.__setitem__('testing_subjs', np.array(['sub-02', 'sub-09'], dtype=VLEN))),
                           r"object '/sub-09' is a soft link to '/sub-01'", 'sub-09', None),
    'subject_hard_alias': (lambda f: (f.__setitem__('sub-09', f['sub-01']),
                                      f.attrs.__setitem__('testing_subjs', np.array(['sub-02', 'sub-09'], dtype=VLEN))),
                           r"is the same HDF5 object as subject 'sub-0[19]' \(a hard link\)", 'sub-', None),
    'same_subject_normalized': (set_attr('/', 'testing_subjs', np.array(['sub-02', './sub-01'], dtype=VLEN)),
                                r"is listed in both training_subjs and testing_subjs \(as 'sub-01' and './sub-01'\)", 'sub-01', None),
    'same_subject_twice': (set_attr('/', 'validation_subjs', np.array(['sub-04', '/sub-04'], dtype=VLEN)),
                           r"is listed twice in validation_subjs", 'sub-04', None),
    'groups_config_list': (set_attr('/', 'groups_config', "['input', 'streamlines']"),
                           r'groups_config attribute is a list once parsed; expected a dict', None, None),
    'groups_config_number': (set_attr('/', 'groups_config', 5),
                             r"root attribute 'groups_config' is a int64 scalar; expected a str holding a dict", None, None),
    'subject_list_of_ints': (set_attr('/', 'training_subjs', np.array([3, 1])),
                             r"root attribute 'training_subjs' is a int64 array of shape \(2,\); expected a list of subject names", None, None),
    'step_size_is_array': (set_attr('/', 'step_size', np.zeros(3)),
                           r"root attribute 'step_size' is a float64 array of shape \(3,\); expected a number", None, None),
}


def crafted(tmp_path, case):
    path = tmp_path / f'{case}.hdf5'
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        CASES[case][0](f)
    return path


def assert_names(message, path, subject, group):
    assert f"file '{path}'" in message
    if subject: assert f"subject '{subject}" in message
    if group: assert f"group '{group}'" in message
    assert 'truncated or corrupted' not in message


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('reader', ['ram', 'lazy', 'describe'])
def test_crafted_file_is_refused_naming_what_is_wrong(tmp_path, case, reader):
    from dwiml_nb.hdf5 import describe_hdf5
    path = crafted(tmp_path, case)
    _, pattern, subject, group = CASES[case]
    with pytest.raises(DataError, match=pattern) as e:
        describe_hdf5(path) if reader == 'describe' else load(path, lazy=reader == 'lazy')
    assert_names(str(e.value), path, subject, group)


@pytest.mark.parametrize('lazy', [False, True])
def test_point_far_outside_the_volume_is_refused(tmp_path, lazy, dwiml_file):
    path, _ = dwiml_file
    with h5py.File(path, 'a') as f:
        f['sub-01/streamlines/data'][5] = [1e8, 2, 2]
    with pytest.raises(DataError, match=r'outside the volume \[6, 7, 5\] plus 1.0 voxel') as e:
        subset = load(path, lazy).training_set
        subset.get_streamlines(1, 'streamlines', np.arange(subset.nb_streamlines(1, 'streamlines')))
    assert_names(str(e.value), path, 'sub-01', 'streamlines')


@pytest.mark.parametrize('lazy', [False, True])
def test_big_endian_data_is_read_as_native(tmp_path, lazy, dwiml_file):
    path, truth = dwiml_file
    with h5py.File(path, 'a') as f:
        for name in ('sub-01/input/data', 'sub-01/streamlines/data', 'sub-01/streamlines/offsets'):
            replace(f[name.rsplit('/', 1)[0]], name.rsplit('/', 1)[1], f[name][()].astype(f[name].dtype.newbyteorder('>')))
    subset = load(path, lazy).training_set
    volume = subset.get_volume(1, 'input')
    assert volume.dtype == torch.float32
    np.testing.assert_array_equal(volume.numpy(), truth['subjects']['sub-01']['input']['data'])
    got = subset.get_streamlines(1, 'streamlines', [4, 0])
    want = truth['subjects']['sub-01']['streamlines']['streamlines']
    np.testing.assert_array_equal(got.data, np.concatenate([want[4], want[0]]).astype(np.float32))
    subset.close()


@pytest.mark.parametrize('how', ['missing', 'nan', 'negative'])
def test_bad_euclidean_lengths_are_recomputed_with_a_warning(tmp_path, caplog, how, dwiml_file):
    path, truth = dwiml_file
    with h5py.File(path, 'a') as f:
        g = f['sub-01/streamlines']
        if how == 'missing': del g['euclidean_lengths']
        else: g['euclidean_lengths'][2] = np.nan if how == 'nan' else -1.0
    with caplog.at_level('WARNING'):
        ds = load(path, lazy=True)
    assert 'recomputing them from the points' in caplog.text and "subject 'sub-01'" in caplog.text
    got = ds.training_set.get_streamline_info(1, 'streamlines').euclidean_lengths
    np.testing.assert_allclose(got, truth['subjects']['sub-01']['streamlines']['euclidean_lengths'], rtol=1e-5)
    ds.close()


def test_data_too_big_for_ram_is_refused_before_allocating(tmp_path, monkeypatch):
    import dwiml_nb.hdf5 as hdf5
    path = tmp_path / 'big.hdf5'
    write_dwiml_hdf5(path)
    monkeypatch.setattr(hdf5.psutil, 'virtual_memory', lambda: type('mem', (), {'available': 1000})())
    with pytest.raises(DataError, match=r'holding it in RAM needs .* GB .*load it with lazy=True') as e:
        load(path, lazy=False)
    assert_names(str(e.value), path, None, None)
    load(path, lazy=True).close()  # lazy mode holds no data
