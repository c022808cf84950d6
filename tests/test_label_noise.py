import torch

from raysub.config import load_config
from raysub.data import open_dataset


def test_noisy_labels_fixed_per_seed_and_fraction():
    cfg = load_config(None, ["data.label_noise=0.8"])
    a, b = open_dataset(cfg), open_dataset(cfg)
    clean = open_dataset(load_config(None, []))
    assert torch.equal(a.labels("train"), b.labels("train"))
    n = clean.size("train")
    assert len(a.corrupted) == round(0.8 * n)
    changed = (a.labels("train") != clean.labels("train")).float().mean().item()
    assert 0.8 * 0.85 < changed < 0.8 * 0.95  # ~1/10 of the redrawn labels land on the true class
    assert torch.equal(a.labels("test"), clean.labels("test"))
    other = open_dataset(load_config(None, ["data.label_noise=0.8", "seed=1"]))
    assert not torch.equal(other.labels("train"), a.labels("train"))
    idx = [torch.arange(0, 50), torch.arange(50, 90)]
    ys = [y for _, y in a.batches("train", idx, augment=False, seed=0)]
    assert torch.equal(torch.cat(ys), a.labels("train")[:90])


def test_no_noise_is_the_plain_dataset():
    from raysub.data import NoisyLabels

    assert not isinstance(open_dataset(load_config(None, [])), NoisyLabels)
