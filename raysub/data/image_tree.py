"""Image trees on a local disk or in object storage, streamed through Ray Data.

An ImageFolder tree (``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``) is listed through ``pyarrow.fs``
(`raysub.uri.open_uri`: a local path, or an ``s3://``/``gs://`` URI with the endpoint from the environment or the
URI's query and the credentials from the environment, never stored), in torchvision's ImageFolder order: classes
sorted, then files sorted by directory and name, image extensions only. A sample is the object's path and label.
A split that holds tar shards instead (WebDataset's layout, `raysub.data.shards`) lists as its samples' places in
the shards, read one image at a time by range.

`stream` turns one `raysub.data.base.Dataset.batches` call (a rank's batches of example indices, with the seed of
each example's augmentation) into a Ray Data pipeline: one block of (index, seed, path, label) rows per batch;
``map_batches(decode_batch)`` reads the objects (a few concurrent reads per task), decodes them with PIL and crops
and flips under each example's own seed, in Ray Data's streaming executor, on any node with a free CPU (or the
nodes ``data.preprocess_labels`` selects, e.g. CPU-only ones), and ships uint8 crops; the consumer receives the rows
in order (``preserve_order``), checks that they are the indices it asked for, cuts them back into its batches and
normalises them (`to_float`, what ``ToTensor`` + ``Normalize`` compute). An example's tensor is therefore a function of (seed, epoch, example) only: bit-identical to torchvision's
ImageFolder + DataLoader path on the same files, whichever worker count, resume point or node decodes it.

Why a dataset per call and not Ray Train's dataset shards (``get_dataset_shard``): those are ``streaming_split``
outputs, whose blocks go to whichever worker asks first, so a rank's batches would depend on timing, and a
restored worker group would start its shards from the beginning instead of the checkpoint's step. raysub's
loops already decide which examples each rank takes, in which order (`raysub.engine.loop.epoch_batches`); Ray Data
does the reading, decoding and augmenting, streaming, with backpressure, on the cluster's CPUs.
"""
from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import posixpath
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import raysub.data.shards as shards
from raysub.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS, lower-case (ImageFolder compares lower-cased names)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGES = ("stop", "skip")
LIST_SAY_S = 5.0  # a listing longer than this says how long it took
READ_THREADS = 8  # concurrent object reads per decode task (an object store answers each read after a latency)
BLOCK_ROWS = 128  # a Ray Data decode task takes at least this many images (consecutive batches joined)


def is_uri(root: str) -> bool:
    return "://" in str(root)


def _open(root: str):
    """(filesystem, base path) of a tree root: `raysub.uri.open_uri` for a URI, the local filesystem otherwise."""
    import pyarrow.fs as pafs

    if is_uri(root):
        from raysub.uri import open_uri

        fs, base = open_uri(root)
        return fs, base.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


_FS: Dict[str, tuple] = {}  # this process's filesystems, by root (a decode task reuses its worker's)


def filesystem(root: str):
    if root not in _FS:
        _FS[root] = _open(root)
    return _FS[root]


def shown(root: str, rel: str = "") -> str:
    """A root (and a path under it) for messages: credentials masked, the query dropped."""
    from raysub.uri import redact

    base = redact(str(root)).split("?", 1)[0].rstrip("/")
    return f"{base}/{rel}" if rel else base


def storage_problem(root: str, exc: BaseException) -> str:
    from raysub.uri import first_line

    return (f"cannot list {shown(root)}: {first_line(exc)}; check the endpoint (AWS_ENDPOINT_URL_S3, or "
            f"?endpoint_override= in data.root), the bucket and the credentials")


_LISTED: Dict[Tuple[str, str], tuple] = {}  # this process's object-store listings: (time, listing)
LIST_TTL_S = 600.0  # a cached listing is redone after this long (a long-lived driver sees a changed tree)


def list_split(root: str, split_dir: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """``(classes, [(path, class), ...])`` of ``root/split_dir`` in ImageFolder order; paths are the filesystem's
    (``bucket/key`` on S3). Classes are every folder of ``split_dir`` (torchvision's ``find_classes``), with images
    or not. A missing folder lists as no classes. An object store's listing is kept for ``LIST_TTL_S`` in this
    process (ImageNet's 1.28 M objects are ~1,300 list requests on S3; the driver checks, then opens, the tree); a
    local tree is listed each time.

    Raises:
        OSError: the storage cannot be reached or refuses the listing.
    """
    key = (str(root), split_dir)
    cached = _LISTED.get(key)
    if cached is not None and time.monotonic() - cached[0] < LIST_TTL_S:
        return cached[1]
    t0 = time.perf_counter()
    listing = _list_split(root, split_dir)
    took = time.perf_counter() - t0
    if took > LIST_SAY_S:  # a long listing is not a hang
        warn(f"[data] listed {len(listing[1]):,} images in {len(listing[0]):,} classes under "
             f"{shown(root, split_dir)} in {took:.0f} s")
    if is_uri(root):
        _LISTED[key] = (time.monotonic(), listing)
    return listing


def _list_split(root: str, split_dir: str):
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    top = f"{base}/{split_dir}"
    info = fs.get_file_info(top)
    if info.type != pafs.FileType.Directory:
        return [], []
    tars, compressed = shards.list_shards(fs, top)
    if tars or compressed:
        return _list_shards(root, fs, tars, compressed)
    files, folders = [], set()
    for entry in fs.get_file_info(pafs.FileSelector(top, recursive=True)):
        rel = entry.path[len(top) + 1:]
        parts = rel.split("/")
        if entry.type == pafs.FileType.Directory:
            folders.add(parts[0])  # every class folder, with images or not (torchvision's find_classes)
            continue
        if entry.type != pafs.FileType.File or len(parts) < 2:
            continue  # a file directly in split/ is not in any class (ImageFolder skips it too)
        folders.add(parts[0])
        if parts[-1].lower().endswith(IMG_EXTENSIONS):
            files.append((parts[0], posixpath.dirname(rel), parts[-1], entry.path))
    files.sort()
    return sorted(folders), [(path, c) for c, _, _, path in files]


def _list_shards(root: str, fs, tars, compressed):
    """list_split of a folder of tar shards: classes are the class indices 0..max (as text), in order."""
    if not tars:
        raise shards.ShardError(f"{object_uri(root, compressed[0])}: a compressed shard cannot be read one image at "
                                f"a time; repack the shards as uncompressed .tar")
    samples = shards.index_shards(fs, tars, lambda path: object_uri(root, path), IMG_EXTENSIONS)
    top = max((t for _, t in samples), default=-1)
    return [str(i) for i in range(top + 1)], [(m, str(t)) for m, t in samples]


def is_sharded(root: str, split_dir: str = "train") -> bool:
    """A local root whose ``split_dir`` holds tar shards (a URI root is listed by `check_tree` instead)."""
    import pyarrow.fs as pafs

    try:
        tars, compressed = shards.list_shards(pafs.LocalFileSystem(),
                                              os.path.join(os.path.abspath(os.path.expanduser(str(root))), split_dir))
    except OSError:  # no such folder
        return False
    return bool(tars or compressed)


def tree_problems(name: str, root: str, dirs: Dict[str, str], partial_val: bool) -> List[str]:
    """One-line problems of an image tree (`check_tree`'s)."""
    return check_tree(name, root, dirs, partial_val)[0]


def check_tree(name: str, root: str, dirs: Dict[str, str], partial_val: bool):
    """``(problems, {split: list_split's listing})`` of an image tree, listed once: unreachable storage, a missing
    bucket or folder, no classes in train/, a class folder with no images, a class of train/ with no images in
    val/ (unless ``partial_val``), a class of val/ that train/ lacks (one line each; no listing when any)."""
    import pyarrow.fs as pafs

    try:
        fs, base = filesystem(root)
        kinds = {d: fs.get_file_info(f"{base}/{d}").type for d in dirs.values()}
    except (OSError, ValueError) as e:
        return [f"dataset {name!r}: {storage_problem(root, e)}"], {}
    missing = [d for d, kind in kinds.items() if kind != pafs.FileType.Directory]
    layout = ("ImageFolder layout root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, or WebDataset shards "
              "root/train/*.tar and root/val/*.tar")
    if missing:
        return [f"dataset {name!r}: no {' or '.join(d + '/' for d in missing)} folder in {shown(root)}; "
                f"expected the {layout}"], {}
    try:
        listed = {s: list_split(root, d) for s, d in dirs.items()}
        (train, train_files), (_, val_files) = listed["train"], listed["test"]
    except shards.ShardError as e:
        return [f"dataset {name!r}: {e}"], {}
    except (OSError, ValueError) as e:
        return [f"dataset {name!r}: {storage_problem(root, e)}"], {}
    if not train_files:
        return [f"dataset {name!r}: no class folder with images (or tar shard with samples) in "
                f"{shown(root, dirs['train'])}; expected the {layout}"], {}
    sharded = isinstance(train_files[0][0], shards.Member)
    what = "class index(es)" if sharded else "class folder(s)"
    problems = []
    empty = sorted(set(train) - {c for _, c in train_files}, key=train.index)
    if empty:  # torchvision's ImageFolder refuses them too: a class no example can have
        fix = "the shards' .cls must number the classes 0..k-1" if sharded else "add images or remove the folder(s)"
        problems.append(f"dataset {name!r}: {what} of train/ in {shown(root)} with no images: "
                        f"{', '.join(empty[:5])}; {fix}")
    val = sorted({c for _, c in val_files})  # a val/ folder with no images counts as a class val/ lacks
    extra = sorted(set(val) - set(train))
    if extra:
        problems.append(f"dataset {name!r}: val/ in {shown(root)} has {what} not in train/: "
                        f"{', '.join(extra[:5])}")
    absent = sorted(set(train) - set(val))
    if absent and not partial_val:
        problems.append(f"dataset {name!r}: {len(absent)} class(es) of train/ have no images in val/ of "
                        f"{shown(root)} ({', '.join(absent[:5])}); add them, or set data.partial_val=true to "
                        f"evaluate on the classes val/ has")
    return problems, ({} if problems else listed)


def load_image(data: bytes):
    """Decoded RGB, as torchvision's ``default_loader`` (PIL) decodes a file."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")


def read_object(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def decode_batch(batch: Dict[str, np.ndarray], *, root: str, transform) -> Dict[str, np.ndarray]:
    """Ray Data UDF: read, decode and crop one block of (index, seed, path, label) rows.

    ``transform`` is the PIL part of the pipeline (crop, flip); each example runs it under
    ``torch.manual_seed(seed)`` (its own augmentation). The crops come back as uint8 C×H×W (a quarter of the
    float32 bytes through the object store); `to_float` finishes them as ``ToTensor`` + ``Normalize`` would. An
    unreadable or undecodable image comes back with ``ok`` false, its reason and a zero crop: the consumer stops
    with its URI (``bad_images="stop"``) or drops it and says so (``"skip"``). Nothing is raised here, so no Ray
    task error wraps the message."""
    fs, _ = filesystem(root)
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    if "offset" in batch:  # tar shards: one range read per image
        keys = [shards.Member(p, int(o), int(z), "") for p, o, z in
                zip(paths, batch["offset"].tolist(), batch["size"].tolist())]
        read = shards.Reader(fs)
    else:
        keys, read = paths, lambda path: read_object(fs, path)
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, max(1, n))) as pool:
        futures = [pool.submit(read, k) for k in keys]
        concurrent.futures.wait(futures)
    if isinstance(read, shards.Reader):
        read.close()
    xs, ok, errors = [None] * n, np.ones(n, dtype=bool), [""] * n
    for i, (future, seed) in enumerate(zip(futures, batch["seed"].tolist())):
        try:
            image = load_image(future.result())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                xs[i] = np.asarray(transform(image), dtype=np.uint8).transpose(2, 0, 1)
        except Exception as e:  # OSError (storage, truncated file), PIL.UnidentifiedImageError, ...
            text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the object", str(e).splitlines()[0] if str(e)
                          else "")
            ok[i], errors[i] = False, f"{type(e).__name__}: {text}"[:200]
    shape = next((x.shape for x in xs if x is not None), None) or transform_shape(transform)
    x = np.empty((n, *shape), dtype=np.uint8)
    for i, xi in enumerate(xs):
        x[i] = xi if xi is not None else 0
    return {"x": x, "label": np.asarray(batch["label"], dtype=np.int64), "index": np.asarray(batch["index"]),
            "ok": ok, "error": np.asarray(errors, dtype=object)}


def to_float(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×C×H×W crops as float32, bit for bit what ``ToTensor`` then ``Normalize(mean, std)`` make of each."""
    out = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return out.sub_(m).div_(s)


def transform_shape(transform) -> Tuple[int, ...]:
    from PIL import Image

    with torch.random.fork_rng(devices=[]):  # a random crop draws: the caller's generator stays as it was
        return tuple(np.asarray(transform(Image.new("RGB", (8, 8))), dtype=np.uint8).transpose(2, 0, 1).shape)


def object_uri(root: str, path: str) -> str:
    """The URI a user would type for one object (``s3://bucket/key``), or the local path."""
    if not is_uri(root):
        return path
    return f"{str(root).split('://', 1)[0]}://{path}"


class Stream:
    """Where decoding runs: Ray Data when Ray is up in this process (a Train worker, a Tune trial, the driver),
    else in this process, one batch at a time (the same function: unit tests, a notebook without Ray).

    Args:
        cpus: CPUs each Ray Data decode task reserves.
        labels: node labels the decode tasks need (``label_selector``), e.g. {"raysub/role": "data"}.
        prefetch: blocks (of ``block_rows`` images or more) Ray Data keeps decoded ahead of the consumer.
        block_rows: images each decode task takes at least (`merge_rows`).
    """

    def __init__(self, cpus: float = 1.0, labels: Optional[Dict[str, str]] = None, prefetch: int = 4,
                 use_ray: Optional[bool] = None, block_rows: int = BLOCK_ROWS):
        self.cpus, self.labels, self.prefetch, self.use_ray = cpus, dict(labels or {}), prefetch, use_ray
        self.block_rows = block_rows
        self._placed = False  # the labels were found on a live node

    def __call__(self, root: str, rows: Sequence[Dict[str, np.ndarray]], transform
                 ) -> Iterator[Dict[str, np.ndarray]]:
        """Decoded blocks for ``rows`` (one dict of columns per requested batch), in order."""
        use_ray = self.use_ray
        if use_ray is None:
            import ray

            use_ray = ray.is_initialized()
        kwargs = dict(root=root, transform=transform)
        if not use_ray:
            for block in rows:
                yield decode_batch(block, **kwargs)
            return
        yield from self._ray(rows, kwargs)

    def _ray(self, rows, kwargs) -> Iterator[Dict[str, np.ndarray]]:
        import pyarrow as pa
        import ray.data

        if self.labels and not self._placed:
            nodes = labelled_nodes(self.labels)
            if not nodes:  # Ray Data would wait for such a node forever
                shown_labels = ", ".join(f"{k}={v}" for k, v in self.labels.items())
                raise DataError(f"data.preprocess_labels: no live node of the cluster has the labels {shown_labels}; "
                                f"start the data nodes with `ray start --labels {shown_labels}` or clear "
                                f"data.preprocess_labels")
            self._placed = True

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no line per epoch's execution: raysub reports
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the consumer's batches, in its order
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        tables = [pa.table({k: (v.tolist() if v.dtype == object else v) for k, v in block.items()})
                  for block in merge_rows(rows, self.block_rows)]
        ds = ray.data.from_arrow(tables)
        options = dict(num_cpus=self.cpus)
        if self.labels:
            options["label_selector"] = self.labels
        ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", fn_kwargs=kwargs,
                            zero_copy_batch=True, **options)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch)


def merge_rows(rows: Sequence[Dict[str, np.ndarray]], block_rows: int) -> List[Dict[str, np.ndarray]]:
    """Consecutive batches' rows joined into blocks of at least ``block_rows`` (the last may be smaller), in order:
    one decode task per block, so a task's fixed cost (scheduling, an object-store round trip) is spread over more
    images than one rank's batch holds (32 at ImageNet's 256 over 8 workers). `rebatch` cuts them back."""
    out, pending, have = [], [], 0
    for block in rows:
        pending.append(block)
        have += len(block["index"])
        if have >= block_rows:
            out.append({k: np.concatenate([b[k] for b in pending]) for k in pending[0]})
            pending, have = [], 0
    if pending:
        out.append({k: np.concatenate([b[k] for b in pending]) for k in pending[0]})
    return out


def labelled_nodes(labels: Dict[str, str]) -> List[str]:
    """Ids of the live nodes of the connected Ray cluster that carry every one of ``labels``."""
    import ray

    return [n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]


def rebatch(blocks: Iterator[Dict[str, np.ndarray]], sizes: Sequence[int]) -> Iterator[Dict[str, np.ndarray]]:
    """Cut a stream of row blocks (split or merged anywhere by Ray Data) back into batches of ``sizes`` rows."""
    pending: List[Dict[str, np.ndarray]] = []
    have = 0
    it = iter(blocks)
    for size in sizes:
        while have < size:
            try:
                block = next(it)
            except StopIteration:
                raise RuntimeError(f"the image stream ended {size - have} rows short of a batch") from None
            if len(block["index"]):
                pending.append(block)
                have += len(block["index"])
        merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
        yield {k: v[:size] for k, v in merged.items()}
        rest = {k: v[size:] for k, v in merged.items()}
        have -= size
        pending = [rest] if have else []
    extra = have + sum(len(block["index"]) for block in it)
    if extra:
        raise RuntimeError(f"the image stream has {extra} rows more than its batches asked for")


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
