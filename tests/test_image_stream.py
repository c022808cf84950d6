"""Image trees streamed through Ray Data (raysub/data/image_tree.py), from a local folder or the loopback S3 server.

What is bit-identical, and pinned here:
- an example's tensor is a function of (seed, epoch, example) only: the Ray Data path gives the DataLoader's tensors
  bit for bit on the same files (`test_ray_data_ingest_equals_the_dataloader_bit_for_bit` runs its function in
  this process);
- across worker counts, a global batch holds the same examples with the same tensors, only split over the ranks
  (`test_a_global_batch_is_the_same_examples_whatever_the_worker_count`); the trajectories then differ only by the
  order of DDP's float sums (tests/test_pipeline.py's parity bound);
- across a resume: tests/test_imagenet.py::test_imagenet_job_pbfgs_end_to_end runs the ImageNet job from the S3
  server through Ray Data's executor on 2 workers, failed mid-epoch and restored from its last checkpoint, and
  its trajectory equals the uninterrupted local-disk DataLoader run's bit for bit.
"""
import os
import socket

import numpy as np
import pytest
import torch

from raysub import data
from raysub.data import image_tree
from raysub.errors import DataError


CLASSES = ("n01", "n02", "n03")


def make_tree(root, per_class=(5, 3), size=24, seed=0, classes=CLASSES):
    """root/{train,val}/<class>/*.JPEG, seeded noise brighter in channel k for class k."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, count in zip(("train", "val"), per_class):
        for k, wnid in enumerate(classes):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            for i in range(count):
                arr = rng.randint(0, 90, (size + i % 3, size, 3))
                arr[..., k % 3] += 120
                Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG"))
    return root


def assert_one_line(message: str, *names):
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


def assert_same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)


# -- unit: the tree, the stream's function, the rebatching ------------------------------------------------------
def test_tree_lists_in_imagefolder_order(tmp_path):
    """The listing is torchvision's ImageFolder order. Catches: sorting by full path (a nested folder's files
    before its parent's), an upper-case extension dropped, a stray non-image or a file directly in
    train/ taken as a sample, classes numbered by first appearance instead of sorted."""
    from PIL import Image
    from torchvision import datasets

    make_tree(tmp_path, per_class=(2, 1))
    os.makedirs(tmp_path / "train" / "n02" / "a_sub")
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "n02" / "a_sub" / "a.JPEG")
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "n02" / "Z.PNG")
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "n02" / "b.jpeg")
    (tmp_path / "train" / "n02" / "notes.txt").write_text("x")
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "loose.JPEG")
    classes, files = image_tree.list_split(str(tmp_path), "train")
    folder = datasets.ImageFolder(str(tmp_path / "train"))
    assert classes == folder.classes == list(CLASSES)
    assert [(p, folder.class_to_idx[c]) for p, c in files] == folder.samples
    assert [os.path.relpath(p, tmp_path / "train") for p, _ in files][2:7] == [
        "n02/Z.PNG", "n02/b.jpeg", "n02/n02_0.JPEG", "n02/n02_1.JPEG", "n02/a_sub/a.JPEG"]  # a folder's own files first


def test_ray_data_ingest_equals_the_dataloader_bit_for_bit(tmp_path):
    """The Ray Data path's function, run in this process, gives the DataLoader's tensors and labels for the same
    files, augmented or not, on both splits, for uneven batches. Catches: a per-example seed that differs from the
    DataLoader's (the hash unshifted, a per-batch seed), the val split read with train's transform or train's
    labels, a decode that skips PIL's RGB conversion, a rebatching that shifts examples across batches."""
    make_tree(tmp_path)
    loader = data.load_dataset("imagenet", str(tmp_path), image_size=16)
    streamed = data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest="ray_data")
    streamed.stream.use_ray = False
    assert loader.ingest == "dataloader" and streamed.ingest == "ray_data"
    assert streamed.labels("train").tolist() == loader.labels("train").tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert streamed.labels("test").tolist() == loader.labels("test").tolist()
    idx = [torch.tensor([14, 3, 7]), torch.tensor([0]), torch.tensor([9, 2, 11, 5])]
    for augment in (True, False):
        for split in ("train", "test"):
            want = [i % loader.size(split) for i in idx]
            assert_same_batches(streamed.batches(split, want, augment=augment, seed=7),
                                loader.batches(split, want, augment=augment, seed=7))
    a = list(streamed.batches("train", idx, augment=True, seed=7))
    b = list(streamed.batches("train", idx, augment=True, seed=8))
    assert not torch.equal(a[0][0], b[0][0])  # the seed reaches the crops


def test_a_global_batch_is_the_same_examples_whatever_the_worker_count(tmp_path):
    """Step s of an epoch: the two ranks' shares (world 2) together are world 1's batch, each example with the same
    tensor. Catches: a rank's augmentation keyed on the rank or the position in its share instead of the example."""
    from raysub.engine import loop

    make_tree(tmp_path)
    ds = data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest="ray_data")
    ds.stream.use_ray = False
    seed = loop.mix_seed(3, 1)
    one = loop.epoch_batches(ds.size("train"), 6, 3, 1, 0, 1)
    shares = [loop.epoch_batches(ds.size("train"), 6, 3, 1, r, 2) for r in (0, 1)]
    x1 = list(ds.batches("train", one, augment=True, seed=seed))
    x2 = [list(ds.batches("train", share, augment=True, seed=seed)) for share in shares]
    for s, (x, y) in enumerate(x1):
        assert torch.equal(torch.cat([one[s][:3], one[s][3:]]), torch.cat([shares[0][s], shares[1][s]]))
        assert torch.equal(x, torch.cat([x2[0][s][0], x2[1][s][0]])) and torch.equal(y, torch.cat([x2[0][s][1],
                                                                                                    x2[1][s][1]]))


def test_rebatch_cuts_blocks_back_into_the_asked_batches():
    """Ray Data may split or merge blocks: rows 0..5 arriving as [0,1] [2,3,4] [] [5] go back out as batches of
    1, 4, 1. Catches: a leftover row dropped between batches, an empty block taken as the end, a short stream
    yielding a short batch instead of failing."""
    def blocks(*cuts):
        return [{"index": np.array(c), "x": np.array(c) * 10.0} for c in cuts]

    out = list(image_tree.rebatch(iter(blocks([0, 1], [2, 3, 4], [], [5])), [1, 4, 1]))
    assert [b["index"].tolist() for b in out] == [[0], [1, 2, 3, 4], [5]]
    assert out[1]["x"].tolist() == [10.0, 20.0, 30.0, 40.0]
    with pytest.raises(RuntimeError, match="1 rows short"):
        list(image_tree.rebatch(iter(blocks([0, 1], [2])), [2, 2]))
    with pytest.raises(RuntimeError, match="2 rows more"):  # surplus rows are not dropped in silence
        list(image_tree.rebatch(iter(blocks([0, 1, 2, 3], [4], [5])), [3, 1]))


def test_merge_rows_joins_consecutive_batches_in_order():
    """Batches of 3, 2, 4, 1 rows with block_rows 5: blocks [3+2], [4+1], in order, every column joined alike; and
    through rebatch they come back as the asked batches. Catches a block cut below block_rows, a reordered or
    dropped batch, columns joined out of step (a path paired with another row's seed)."""
    rows = [{"index": np.arange(a, b), "path": np.array([f"p{i}" for i in range(a, b)], dtype=object)}
            for a, b in ((0, 3), (3, 5), (5, 9), (9, 10))]
    blocks = image_tree.merge_rows(rows, 5)
    assert [b["index"].tolist() for b in blocks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert blocks[1]["path"].tolist() == ["p5", "p6", "p7", "p8", "p9"]
    assert [b["index"].tolist() for b in image_tree.merge_rows(rows, 100)] == [list(range(10))]
    back = list(image_tree.rebatch(iter(blocks), [3, 2, 4, 1]))
    assert [b["index"].tolist() for b in back] == [r["index"].tolist() for r in rows]


def _truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 3])


def test_an_unreadable_image_stops_with_its_path_or_is_skipped_with_a_line(tmp_path, capsys):
    """``data.bad_images``: stop (default) raises one line naming the file; skip leaves it out of its batch and says
    so on stderr. Catches: a PIL traceback instead of the file's name, a skipped image that silently shrinks the
    batch, a skipped image whose label stays in the batch (x and y of different lengths)."""
    make_tree(tmp_path)
    bad = tmp_path / "train" / "n02" / "n02_1.JPEG"
    _truncate(bad)
    idx = [torch.tensor([0, 6, 1])]  # 6 is n02_1
    for ingest in ("dataloader", "ray_data"):
        ds = data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest=ingest)
        ds.stream.use_ray = False
        with pytest.raises(DataError) as e:
            list(ds.batches("train", idx, augment=False, seed=0))
        assert_one_line(str(e.value), bad, "data.bad_images")
    ds = data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest="ray_data", bad_images="skip")
    ds.stream.use_ray = False
    ((x, y),) = list(ds.batches("train", idx, augment=False, seed=0))
    assert x.shape[0] == 2 and y.tolist() == [0, 0]
    err = capsys.readouterr().err
    assert f"skipped unreadable image {bad}" in err and err.count("skipped") == 1
    assert "BytesIO" not in err  # PIL's message names an in-memory file: the URI is what the user needs
    rng = torch.get_rng_state()  # a batch of bad images only (its shape is found by a random crop of a blank)
    ((x, y),) = list(ds.batches("train", [torch.tensor([6])], augment=True, seed=0))
    assert x.shape == (0, 3, 16, 16) and len(y) == 0 and torch.equal(torch.get_rng_state(), rng)


def test_options_and_a_val_missing_a_class_are_refused_in_one_line(tmp_path):
    """Catches: a val/ lacking a class accepted silently (evaluation on fewer classes, with either reader), an
    unknown ingest or bad_images value, skip asked of the DataLoader (which cannot drop an example), the DataLoader
    pointed at a URI, a URI root whose crop size or node labels go unchecked, an empty class folder that one reader
    refuses and the other drops (the two would number the classes differently)."""
    make_tree(tmp_path)
    for f in (tmp_path / "val" / "n03").iterdir():
        f.unlink()
    for ingest in ("dataloader", "ray_data"):
        with pytest.raises(DataError) as e:
            data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest=ingest)
        assert_one_line(str(e.value), "n03", "data.partial_val=true")
        ds = data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest=ingest, partial_val=True)
        assert ds.num_classes == 3 and ds.labels("test").tolist() == [0] * 3 + [1] * 3
    problems = data.validate_dataset("imagenet", str(tmp_path), ingest="fast", bad_images="ignore")
    assert any("ingest='fast'" in p for p in problems) and any("bad_images='ignore'" in p for p in problems)
    problems = data.validate_dataset("imagenet", str(tmp_path), bad_images="skip")
    assert problems == ["dataset 'imagenet': bad_images=skip needs ingest=ray_data (the DataLoader stops)"]
    problems = data.validate_dataset("imagenet", "s3://b/x?endpoint_override=127.0.0.1:1&scheme=http",
                                     ingest="dataloader", image_size=-3, preprocess_labels={"role": 1})
    assert any("ingest=dataloader reads a local folder" in p for p in problems)
    assert any("image_size=-3 must be a positive integer" in p for p in problems)  # a URI root is checked too
    assert any("preprocess_labels={'role': 1}" in p for p in problems)
    # a class folder with no images in train/: both readers refuse it (torchvision's ImageFolder does)
    (tmp_path / "train" / "n00").mkdir()
    for ingest in ("dataloader", "ray_data"):
        with pytest.raises(DataError, match="n00"):
            data.load_dataset("imagenet", str(tmp_path), image_size=16, ingest=ingest, partial_val=True)


# -- system: the loopback S3 server; the session's Ray ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_tree(tmp_path_factory):
    """A generated tree on local disk and uploaded to the loopback S3 server: {"local", "uri", "s3"}."""
    pytest.importorskip("moto.server", reason="moto[server] (pip install -e .[test]) runs the S3 server")
    from helpers import loopback_s3

    local = make_tree(tmp_path_factory.mktemp("tree"), per_class=(8, 4))
    with loopback_s3() as s3:
        assert s3.upload(local, "imagenet") == 3 * 12
        yield {"local": str(local), "uri": s3.uri("imagenet"), "s3": s3}


@pytest.mark.system  # moto's S3 server
def test_bad_s3_roots_are_one_line_before_anything_starts(s3_tree):
    """An unreachable endpoint, a missing bucket, a missing prefix, a tree with no class folders: each is one line
    from the checks that run before Ray starts, naming the root. Catches: pyarrow's multi-line error, an empty
    listing taken for an empty dataset, credentials printed in the message."""
    s3 = s3_tree["s3"]
    dead = f"s3://raysub-test/imagenet?endpoint_override=127.0.0.1:{_free_port()}&scheme=http&region=us-east-1"
    cases = {
        dead: "cannot list s3://raysub-test/imagenet",
        f"s3://no-such-bucket/imagenet{s3.query}": "s3://no-such-bucket/imagenet",
        s3.uri("nothing-here"): "no train/ or val/ folder in s3://raysub-test/nothing-here",
    }
    s3.client().put_object(Bucket="raysub-test", Key="empty/train/readme.txt", Body=b"x")
    s3.client().put_object(Bucket="raysub-test", Key="empty/val/readme.txt", Body=b"x")
    cases[s3.uri("empty")] = "no class folder with images (or tar shard with samples) in s3://raysub-test/empty/train"
    for root, expected in cases.items():
        problems = data.validate_dataset("imagenet", root)
        assert len(problems) == 1, problems
        assert_one_line(problems[0], expected)
        assert "endpoint_override" not in problems[0] or root == dead
    # the good tree: no problem, and listed as the local copy is (the same relative paths, in the same order)
    assert data.validate_dataset("imagenet", s3_tree["uri"]) == []
    for split in ("train", "val"):
        (rc, remote), (lc, local) = (image_tree.list_split(r, split) for r in (s3_tree["uri"], s3_tree["local"]))
        assert rc == lc == list(CLASSES)
        assert [p.split("/imagenet/", 1)[1] for p, _ in remote] == [os.path.relpath(p, s3_tree["local"])
                                                                    for p, _ in local]


def test_decode_tasks_go_to_labelled_nodes_or_the_run_says_none_has_them(ray_session):
    """``data.preprocess_labels`` (the decode tasks' node labels): a node that carries them is found; labels no
    node has are one line naming them and the fix, not a pipeline waiting forever for such a node. Catches: a
    check that passes on any label (no node would ever run the tasks), a partial match taken for a match."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    assert image_tree.labelled_nodes({"ray.io/node-id": node}) == [node]
    assert image_tree.labelled_nodes({"ray.io/node-id": node, "raysub/role": "data"}) == []
    stream = image_tree.Stream(labels={"raysub/role": "data"}, use_ray=True)
    with pytest.raises(DataError) as e:
        next(stream("unused", [], None))
    assert_one_line(str(e.value), "raysub/role=data", "ray start --labels raysub/role=data")
