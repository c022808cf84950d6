"""data.classes: a class subset of a dataset (`ClassSubset`), relabelled 0..k-1, applied before label noise and
the held-out validation split. Runs on the embedded digits (and a tiny hand-made dataset); nothing starts Ray."""
import pytest
import torch

from raysub.config import load_config
from raysub.data import ClassSubset, HoldOut, InMemoryDataset, NoisyLabels, load_dataset, open_dataset
from raysub.errors import ConfigError, DataError
from raysub.pipeline.plan import check, validate


def kept(labels: torch.Tensor, classes):
    """Indices of the examples of ``classes`` (in index order) and their new labels, computed independently of
    ClassSubset: a plain loop over the labels."""
    idx = [i for i, c in enumerate(labels.tolist()) if c in classes]
    return torch.tensor(idx), torch.tensor([classes.index(labels[i].item()) for i in idx])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_sizes_and_labels_per_split(digits):
    """Every split (train and test) keeps exactly the examples of the listed classes, relabelled in the order
    given (catches: filtering the train split only, sorting the classes so 3 -> 0, a wrong num_classes)."""
    data = open_dataset(load_config(None, ["data.classes=[7,3]"]))
    assert isinstance(data, ClassSubset) and data.num_classes == 2
    assert data.input_shape == digits.input_shape
    for split in ("train", "test"):
        base = digits.labels(split)
        assert data.size(split) == int((base == 7).sum() + (base == 3).sum())
        _, expected = kept(base, [7, 3])
        assert torch.equal(data.labels(split), expected)
        assert int((data.labels(split) == 0).sum()) == int((base == 7).sum())  # 7 -> 0, not 7 -> 1
    # order matters: the same classes listed the other way round swap the labels
    swapped = open_dataset(load_config(None, ["data.classes=[3,7]"]))
    assert torch.equal(swapped.labels("train"), 1 - data.labels("train"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_are_the_base_examples(digits, split):
    """Subset index i is the i-th kept base example: x identical to the base's, y relabelled (catches: batches
    that read base index i instead of the mapped one, or pass the base label through)."""
    data = ClassSubset(digits, [7, 3])
    base_idx, new_y = kept(digits.labels(split), [7, 3])
    n = data.size(split)
    batches = [torch.arange(0, 5), torch.tensor([n - 1, 2, 9]), torch.arange(n)]
    for (x, y), idx in zip(data.batches(split, batches, augment=False, seed=0), batches):
        (bx, by), = digits.batches(split, [base_idx[idx]], augment=False, seed=0)
        assert torch.equal(x, bx)
        assert torch.equal(y, new_y[idx])
        assert set(by.tolist()) <= {7, 3} and torch.equal(y, (by == 3).long())  # 7 -> 0, 3 -> 1 on the examples
    # pinned on one actual example: the first 3 of the split is the base's first 3, with label 1
    first3 = int((digits.labels(split) == 3).nonzero()[0])
    pos = int((base_idx == first3).nonzero()[0])
    (x, y), = data.batches(split, [torch.tensor([pos])], augment=False, seed=0)
    (bx, _), = digits.batches(split, [torch.tensor([first3])], augment=False, seed=0)
    assert torch.equal(x, bx) and y.tolist() == [1]


def test_deterministic_and_none_is_all_classes():
    """No randomness in the subset; data.classes unset is the plain dataset."""
    a = open_dataset(load_config(None, ["data.classes=[1,2,5]", "seed=3"]))
    b = open_dataset(load_config(None, ["data.classes=[1,2,5]", "seed=4"]))
    assert torch.equal(a.labels("train"), b.labels("train")) and torch.equal(a.index["test"], b.index["test"])
    assert not isinstance(open_dataset(load_config(None, [])), ClassSubset)


def test_plan_builds_a_k_class_model():
    """The model gets k outputs (catches a wrapper that keeps the base's num_classes)."""
    from raysub.pipeline.plan import plan

    out = plan(load_config(None, ["data.classes=[0,1,2]", "data.batch_size=32"]))
    assert out["num_classes"] == 3
    assert out["model"](torch.zeros(2, 64)).shape == (2, 3)


def test_label_noise_draws_among_the_kept_classes(digits):
    """Noise comes after the subset: the redrawn labels are < k, and about 1/k of them keep their true label
    (catches noise applied before the subset, which would draw among 10 classes and leave labels up to 9)."""
    data = open_dataset(load_config(None, ["data.classes=[7,3,5]", "data.label_noise=1.0"]))
    assert isinstance(data, NoisyLabels) and isinstance(data.base, ClassSubset) and data.num_classes == 3
    noisy, clean = data.labels("train"), data.base.labels("train")
    assert len(noisy) == data.base.size("train") and 0 <= int(noisy.min()) and int(noisy.max()) == 2
    assert set(noisy.tolist()) == {0, 1, 2}
    same = (noisy == clean).float().mean().item()
    assert 0.2 < same < 0.47  # ~1/3 keep their label (with 10 classes drawn it would be ~1/10)
    assert torch.equal(data.labels("test"), kept(digits.labels("test"), [7, 3, 5])[1])


def test_val_is_held_out_of_the_subset(digits):
    """val_fraction after the subset: val and train partition the subset's training examples, all of the kept
    classes (catches HoldOut applied first, whose val would hold every class)."""
    data = open_dataset(load_config(None, ["data.classes=[7,3]", "data.val_fraction=0.25"]))
    assert isinstance(data, HoldOut) and isinstance(data.base, ClassSubset) and data.num_classes == 2
    n = data.base.size("train")
    assert data.size("val") == round(0.25 * n) and data.size("val") + data.size("train") == n
    assert set(data.labels("val").tolist()) == {0, 1} and set(data.labels("train").tolist()) == {0, 1}
    # the val examples are base examples of 7 and 3
    base_idx, _ = kept(digits.labels("train"), [7, 3])
    (x, y), = data.batches("val", [torch.arange(data.size("val"))], augment=False, seed=0)
    (bx, by), = digits.batches("train", [base_idx[data.index["val"]]], augment=False, seed=0)
    assert torch.equal(x, bx) and torch.equal(y, (by == 3).long())
    assert data.size("test") == int(((digits.labels("test") == 7) | (digits.labels("test") == 3)).sum())


@pytest.mark.parametrize("value, needle", [
    ("[3]", "data.classes=[3]: a subset needs at least 2 classes"),
    ("[]", "data.classes=[]: a subset needs at least 2 classes"),
    ("[3,5,3]", "data.classes=[3, 5, 3] names class 3 twice: list each class once"),
    ("[-1,2]", "data.classes=[-1, 2] names class -1: class numbers start at 0"),
    ("[0,12]", "data.classes=[0, 12] names class 12, but digits has 10 classes (0–9): pick classes in that range"),
    ("[0,10]", "data.classes=[0, 10] names class 10, but digits has 10 classes (0–9)"),  # off by one: 10 is out
])
def test_config_errors(value, needle):
    cfg = load_config(None, [f"data.classes={value}"])
    problems = validate(cfg)
    assert [p for p in problems if "data.classes" in p] == [p for p in problems if needle in p], problems
    assert any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(ConfigError):
        check(cfg)


def test_config_range_uses_the_registered_class_count():
    """fashion-mnist's 10 classes are known before loading (no files needed); ImageNet counts its folders, so
    its range is checked at open time only; class 9 of a 10-class dataset is fine."""
    cfg = load_config(None, ["data.name=fashion-mnist", "data.classes=[0,12]"])
    assert "data.classes=[0, 12] names class 12, but fashion-mnist has 10 classes (0–9): pick classes in that " \
           "range" in validate(cfg, check_data=False)
    ok = validate(load_config(None, ["data.name=fashion-mnist", "data.classes=[9,0]"]), check_data=False)
    assert not [p for p in ok if "data.classes" in p]
    inet = validate(load_config(None, ["data.name=imagenet", "data.classes=[0,5000]"]), check_data=False)
    assert not [p for p in inet if "data.classes" in p]


def test_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="data.classes: expected a list"):
        load_config(None, ["data.classes=3"])
    with pytest.raises(ConfigError, match=r"data.classes\[1\]: expected an integer"):
        load_config(None, ["data.classes=[1,two]"])


def test_class_beyond_the_dataset_at_open_time(digits):
    """A class the loaded dataset lacks is a one-line DataError (the path ImageNet's check takes)."""
    with pytest.raises(DataError) as exc:
        ClassSubset(digits, [7, 12])
    assert str(exc.value) == ("data.classes=[7, 12] names class 12, but digits has 10 classes (0–9): pick classes in "
                              "that range")
    with pytest.raises(ConfigError, match="names class 7 twice"):  # direct use is checked like the config
        ClassSubset(digits, [7, 7])


class Tiny(InMemoryDataset):
    """3 classes; the test split has no example of class 2."""

    name = "tiny"
    num_classes = 3

    def __init__(self):
        x = {"train": torch.arange(6.0).reshape(6, 1), "test": torch.arange(10.0, 13.0).reshape(3, 1)}
        self._finish(x, {"train": torch.tensor([2, 0, 1, 2, 0, 1]), "test": torch.tensor([1, 0, 1])})


def test_class_missing_from_a_split():
    with pytest.raises(DataError) as exc:
        ClassSubset(Tiny(), [0, 2])
    assert str(exc.value) == ("data.classes=[0, 2]: class 2 has no examples in the test split of tiny; leave it out "
                              "of data.classes")


def test_hand_computed_subset():
    """Pinned by hand: classes [1, 0] keep train examples 1, 2, 4, 5 (x 1, 2, 4, 5; labels 0->1, 1->0, so 1, 0, 1,
    0) and all of test (labels 1, 0, 1 -> 0, 1, 0)."""
    data = ClassSubset(Tiny(), [1, 0])
    assert (data.size("train"), data.size("test")) == (4, 3)
    assert data.labels("train").tolist() == [1, 0, 1, 0] and data.labels("test").tolist() == [0, 1, 0]
    (x, y), = data.batches("train", [torch.tensor([3, 0, 2])], augment=False, seed=0)
    assert x.flatten().tolist() == [5.0, 1.0, 4.0] and y.tolist() == [0, 1, 1]
    (x, y), = data.batches("test", [[1]], augment=False, seed=0)
    assert x.flatten().tolist() == [11.0] and y.tolist() == [1]
    with pytest.raises(ValueError, match="split must be one of"):
        data.size("val")
