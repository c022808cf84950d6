"""WebDataset-style tar shards (raysub/data/shards.py): indexed once, read one image at a time, bit for bit the
ImageFolder tree they were packed from (in this process, through Ray Data, and from the loopback S3 server)."""
import io
import os
import tarfile

import pytest
import torch

from raysub import data
from raysub.data import image_tree, shards
from raysub.errors import DataError
from test_image_stream import assert_one_line, assert_same_batches, make_tree


def pack_shards(tree, out, per_shard=4):
    """out/{train,val}/<split>-NNNNNN.tar from an ImageFolder tree, in its order: KEY.<ext> (the image), KEY.cls (its
    class index), KEY.json (a member raysub ignores); the first train shard's members sit in a folder path."""
    from torchvision import datasets

    for split in ("train", "val"):
        samples = datasets.ImageFolder(os.path.join(tree, split)).samples
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for s in range(0, len(samples), per_shard):
            with tarfile.open(os.path.join(out, split, f"{split}-{s // per_shard:06d}.tar"), "w") as tar:
                for path, label in samples[s:s + per_shard]:
                    key = os.path.splitext(os.path.relpath(path, os.path.join(tree, split)))[0]
                    tar.add(path, arcname=key + os.path.splitext(path)[1])
                    for ext, body in ((".cls", f"{label}\n"), (".json", '{"note": 1}')):
                        add_bytes(tar, key + ext, body.encode())
    return str(out)


def add_bytes(tar, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    tar.addfile(info, io.BytesIO(body))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test indexes into its own cache folder, from an empty in-process index."""
    monkeypatch.setenv("RAYSUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "_INDEXED", {})


def test_shards_give_the_trees_tensors_bit_for_bit(tmp_path):
    """Shards packed from a tree, read one image at a time: labels, sizes and every batch (both splits, augmented
    or not) equal the tree's DataLoader. Catches: an image read at the member header's offset (512 bytes early) or
    with the .cls's bytes, shards taken in listing instead of name order, members of a sample not grouped by key
    (the .json taken as a sample), a class index read off by one."""
    tree = make_tree(tmp_path / "tree", per_class=(5, 3))
    root = pack_shards(tree, tmp_path / "shards", per_shard=4)
    loader = data.load_dataset("imagenet", str(tree), image_size=16)
    sharded = data.load_dataset("imagenet", root, image_size=16)
    sharded.stream.use_ray = False
    assert sharded.ingest == "ray_data"  # auto: shards are read through the stream
    assert len(os.listdir(os.path.join(root, "train"))) == 4
    assert sharded.num_classes == 3 and sharded.classes == ["0", "1", "2"]
    for split in ("train", "test"):
        assert sharded.size(split) == loader.size(split)
        assert sharded.labels(split).tolist() == loader.labels(split).tolist()
    idx = [torch.tensor([14, 3, 7]), torch.tensor([0]), torch.tensor([9, 2, 11, 5])]
    for augment in (True, False):
        for split in ("train", "test"):
            want = [i % loader.size(split) for i in idx]
            assert_same_batches(sharded.batches(split, want, augment=augment, seed=7),
                                loader.batches(split, want, augment=augment, seed=7))
    member, label = sharded._samples["train"][5]  # the second shard's second sample: n02_0 (train 5 of 15)
    assert (member.name, label) == ("n02/n02_0.JPEG", 1) and member.shard.endswith("train-000001.tar")
    with pytest.raises(DataError) as e:
        data.load_dataset("imagenet", root, image_size=16, ingest="dataloader")
    assert_one_line(str(e.value), "ingest=dataloader", "tar shards", "ingest=ray_data")


def test_a_shards_index_is_cached_per_node_and_redone_when_the_shard_changes(tmp_path, monkeypatch):
    """The index is read back from the cache file (no shard is re-read), and a rewritten shard (another size or
    time) is indexed again. Catches: a cache keyed by name only (a repacked shard's old offsets read the wrong
    bytes), a cache that is written but never read."""
    tree = make_tree(tmp_path / "tree", per_class=(3, 1))
    root = pack_shards(tree, tmp_path / "shards", per_shard=5)
    first = image_tree.list_split(root, "train")
    assert len(os.listdir(shards.cache_dir())) == 2  # one file per shard
    monkeypatch.setattr(shards, "_INDEXED", {})
    reads = []
    real = shards.index_shard
    monkeypatch.setattr(shards, "index_shard", lambda *a: reads.append(a) or real(*a))
    assert image_tree.list_split(root, "train") == first and reads == []
    shard = os.path.join(root, "train", "train-000001.tar")
    with tarfile.open(shard, "a") as tar:
        add_bytes(tar, "zz/extra.jpg", open(os.path.join(tree, "train", "n03", "n03_2.JPEG"), "rb").read())
        add_bytes(tar, "zz/extra.cls", b"2")
    monkeypatch.setattr(shards, "_INDEXED", {})
    classes, files = image_tree.list_split(root, "train")
    assert len(reads) == 1 and reads[0][1].path.endswith("train-000001.tar")
    assert len(files) == len(first[1]) + 1 and files[-1][0].name == "zz/extra.jpg" and files[-1][1] == "2"


def _one_shard(path, members):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            add_bytes(tar, name, body)


def test_bad_shards_are_one_line_naming_the_shard_and_the_sample(tmp_path):
    """Catches: a sample without its .cls taken with label 0, a non-integer class index parsed loosely, a compressed
    shard opened (random reads would scan it), a file that is not a tar indexed as empty, a key split across the
    shard (WebDataset would make two samples of it), val labels beyond train's, a gap in train's class indices."""
    jpg = (make_tree(tmp_path / "tree", per_class=(1, 1)) / "train" / "n01" / "n01_0.JPEG").read_bytes()
    ok_val = [("v.jpg", jpg), ("v.cls", b"0")]
    cases = {
        "no_cls": ([("a.jpg", jpg), ("b.jpg", jpg), ("b.cls", b"0")], "sample 'a' has no .cls class index"),
        "bad_cls": ([("a.jpg", jpg), ("a.cls", b"cat")], "class index 'cat' is not an integer"),
        "split_key": ([("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"0"), ("a.json", b"{}")],
                      "key 'a' comes back"),
        "gap": ([("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"2")], "class index(es) of train/"),
    }
    for case, (members, expected) in cases.items():
        root = tmp_path / case
        _one_shard(str(root / "train" / "s-0.tar"), members)
        _one_shard(str(root / "val" / "s-0.tar"), ok_val)
        problems = data.validate_dataset("imagenet", str(root))
        assert len(problems) == (2 if case == "gap" else 1), (case, problems)  # gap: val/ lacks 1 and 2 too
        assert_one_line(problems[0], expected, root if case == "gap" else root / "train" / "s-0.tar")
    root = tmp_path / "gz"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "train" / "s-0.tar.gz").write_bytes(b"x")
    (problem,) = data.validate_dataset("imagenet", str(root))
    assert_one_line(problem, root / "train" / "s-0.tar.gz", "repack the shards as uncompressed .tar")
    (root / "train" / "s-0.tar.gz").unlink()
    (root / "train" / "s-0.tar").write_bytes(b"not a tar at all" * 64)
    (problem,) = data.validate_dataset("imagenet", str(root))
    assert_one_line(problem, f"bad shard {root / 'train' / 's-0.tar'}: not a readable tar")
    root = tmp_path / "val_extra"
    _one_shard(str(root / "train" / "s-0.tar"), [("a.jpg", jpg), ("a.cls", b"0")])
    _one_shard(str(root / "val" / "s-0.tar"), [("v.jpg", jpg), ("v.cls", b"0"), ("w.jpg", jpg), ("w.cls", b"1")])
    (problem,) = data.validate_dataset("imagenet", str(root))
    assert_one_line(problem, "val/", "class index(es) not in train/: 1")


def test_a_class_archive_left_in_an_imagefolder_split_does_not_make_it_shards(tmp_path):
    """ImageNet's train/ often keeps n01440764.tar beside the extracted n01440764/: still an ImageFolder split, read
    by the DataLoader as before. And a .cls that is a digit to Python but not to int() ('²') is one line about the
    sample. Catches any .tar switching the layout (a working tree refused), a ValueError escaping as a storage
    problem."""
    tree = make_tree(tmp_path / "tree", per_class=(2, 1))
    (tree / "train" / "n01.tar").write_bytes(b"an archive of n01")
    assert not image_tree.is_sharded(str(tree))
    ds = data.load_dataset("imagenet", str(tree), image_size=16)
    assert ds.ingest == "dataloader" and ds.size("train") == 6
    classes, files = image_tree.list_split(str(tree), "train")
    assert classes == ["n01", "n02", "n03"] and len(files) == 6
    jpg = (tree / "train" / "n01" / "n01_0.JPEG").read_bytes()
    root = tmp_path / "odd_cls"
    _one_shard(str(root / "train" / "s-0.tar"), [("a.jpg", jpg), ("a.cls", "²".encode())])
    _one_shard(str(root / "val" / "s-0.tar"), [("v.jpg", jpg), ("v.cls", b"0")])
    (problem,) = data.validate_dataset("imagenet", str(root))
    assert_one_line(problem, "bad shard", "class index '²' is not an integer")


def test_an_unreadable_image_in_a_shard_names_the_shard_and_member(tmp_path, capsys):
    """Catches: the shard's URI without the member (which of a thousand images?), a skipped image left in y."""
    jpg = (make_tree(tmp_path / "tree", per_class=(1, 1)) / "train" / "n01" / "n01_0.JPEG").read_bytes()
    root = tmp_path / "shards"
    _one_shard(str(root / "train" / "s-0.tar"), [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg[:200]),
                                                 ("b.cls", b"1")])
    _one_shard(str(root / "val" / "s-0.tar"), [("v.jpg", jpg), ("v.cls", b"0"), ("w.jpg", jpg), ("w.cls", b"1")])
    ds = data.load_dataset("imagenet", str(root), image_size=16)
    ds.stream.use_ray = False
    with pytest.raises(DataError) as e:
        list(ds.batches("train", [torch.tensor([1, 0])], augment=False, seed=0))
    assert_one_line(str(e.value), f"{root}/train/s-0.tar (member b.jpg)", "data.bad_images=skip")
    ds = data.load_dataset("imagenet", str(root), image_size=16, bad_images="skip")
    ds.stream.use_ray = False
    ((x, y),) = list(ds.batches("train", [torch.tensor([1, 0])], augment=False, seed=0))
    assert x.shape[0] == 1 and y.tolist() == [0]
    assert "skipped unreadable image" in capsys.readouterr().err


def test_shards_through_ray_data_equal_the_tree(tmp_path, ray_session):
    """The decode tasks on Ray Data's executor take the shard columns (offset, size) through Arrow.
    Catches: a column lost or retyped on the way (every image read from offset 0), rows reordered."""
    tree = make_tree(tmp_path / "tree", per_class=(5, 3))
    root = pack_shards(tree, tmp_path / "shards", per_shard=4)
    loader = data.load_dataset("imagenet", str(tree), image_size=16)
    sharded = data.load_dataset("imagenet", root, image_size=16)
    sharded.stream.use_ray = True
    idx = [torch.tensor([14, 3, 7]), torch.tensor([0, 1]), torch.tensor([9, 2, 11, 5])]
    assert_same_batches(sharded.batches("train", idx, augment=True, seed=3),
                        loader.batches("train", idx, augment=True, seed=3))


@pytest.mark.system  # moto's S3 server
def test_shards_in_object_storage_equal_the_tree(tmp_path):
    """Shards uploaded to the loopback S3 server: checked, indexed and read by range (each shard opened once per decode task) as the local
    tree's DataLoader reads the same images. Catches: a range read that ignores the offset on S3, the index keyed by the local path."""
    pytest.importorskip("moto.server", reason="moto[server] (pip install -e .[test]) runs the S3 server")
    from helpers import loopback_s3

    tree = make_tree(tmp_path / "tree", per_class=(5, 3))
    root = pack_shards(tree, tmp_path / "shards", per_shard=4)
    loader = data.load_dataset("imagenet", str(tree), image_size=16)
    with loopback_s3() as s3:
        assert s3.upload(root, "shards") == 4 + 3
        uri = s3.uri("shards")
        assert data.validate_dataset("imagenet", uri) == []
        sharded = data.load_dataset("imagenet", uri, image_size=16)
        sharded.stream.use_ray = False
        assert sharded._samples["train"][0][0].shard.startswith("raysub-test/shards/train/")
        idx = [torch.tensor([14, 3, 7]), torch.tensor([9, 2, 11, 5])]
        for split in ("train", "test"):
            want = [i % loader.size(split) for i in idx]
            assert_same_batches(sharded.batches(split, want, augment=True, seed=5),
                                loader.batches(split, want, augment=True, seed=5))
