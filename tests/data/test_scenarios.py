"""Tests of duallora.data.scenarios.ClassIncrementalScenario on synthetic and real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from duallora.data import ClassIncrementalScenario, Task, TensorImageDataset, load_dataset
from duallora.errors import DataError


def make(counts: list[int], name: str = "syn") -> TensorImageDataset:
    """Images whose first pixel is the item index; ``counts[c]`` items of class c, interleaved."""
    targets = []
    remaining = list(counts)
    while any(remaining):
        for c, r in enumerate(remaining):
            if r:
                targets.append(c)
                remaining[c] -= 1
    n = len(targets)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return TensorImageDataset(images, targets, [f"c{c}" for c in range(len(counts))], name=name)


TRAIN6 = [5, 6, 7, 8, 9, 10]  # 45 images
TEST6 = [2, 2, 2, 2, 2, 2]


def scenario(**kw) -> ClassIncrementalScenario:
    return ClassIncrementalScenario(make(TRAIN6), make(TEST6), **kw)


def test_explicit_order_mappings():
    s = scenario(num_tasks=3, class_order=[3, 1, 4, 0, 2, 5])
    assert s.class_order == [3, 1, 4, 0, 2, 5]
    assert s.num_classes == 6 and s.num_tasks == 3 and s.classes_per_task == 2
    assert s.tasks == [Task(0, (3, 1), 0), Task(1, (4, 0), 2), Task(2, (2, 5), 4)]
    assert s.position_of(torch.tensor(4)).item() == 2
    assert s.task_of(torch.tensor(4)).item() == 1
    assert s.local_index(torch.tensor(4)).item() == 0
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    assert s.position_of(labels).tolist() == [3, 1, 4, 0, 2, 5]
    assert s.task_of(labels).tolist() == [1, 0, 2, 0, 1, 2]
    assert s.local_index(labels).tolist() == [1, 1, 0, 0, 0, 1]
    assert s.label_of_position(torch.arange(6)).tolist() == [3, 1, 4, 0, 2, 5]
    assert s.label_of_position(s.position_of(labels)).tolist() == labels.tolist()
    # shapes and list inputs are kept
    assert s.position_of(torch.tensor([[5, 3], [0, 0]])).tolist() == [[5, 0], [3, 3]]
    assert s.position_of([4, 5]).dtype == torch.int64
    assert s.class_names == ["c3", "c1", "c4", "c0", "c2", "c5"]


def test_seeded_and_natural_order():
    a = scenario(num_tasks=2, seed=7)
    b = scenario(num_tasks=2, seed=7)
    c = scenario(num_tasks=2, seed=8)
    assert a.class_order == b.class_order == np.random.default_rng(7).permutation(6).tolist()
    assert c.class_order == np.random.default_rng(8).permutation(6).tolist()
    assert a.class_order != c.class_order
    assert scenario(num_tasks=2, seed=7, shuffle_classes=False).class_order == [0, 1, 2, 3, 4, 5]
    # an explicit order wins over the shuffle
    assert scenario(num_tasks=2, seed=7, class_order=[5, 4, 3, 2, 1, 0]).class_order == [5, 4, 3, 2, 1, 0]


def test_classes_per_task_equivalent():
    a = scenario(num_tasks=3, seed=1)
    b = scenario(classes_per_task=2, seed=1)
    c = scenario(num_tasks=3, classes_per_task=2, seed=1)
    assert a.tasks == b.tasks == c.tasks
    assert scenario(classes_per_task=6).num_tasks == 1
    assert scenario(num_tasks=6).classes_per_task == 1


def test_tasks_disjoint_cover_and_counts():
    s = scenario(num_tasks=3, class_order=[3, 1, 4, 0, 2, 5])
    all_classes = [c for t in s.tasks for c in t.classes]
    assert sorted(all_classes) == list(range(6)) and len(set(all_classes)) == 6
    train_t = s.train.targets
    for t, task in enumerate(s.tasks):
        idx = s.train_indices(t)
        assert idx == sorted(idx)
        assert sorted(set(train_t[idx].tolist())) == sorted(task.classes)
        assert idx == [i for i in range(len(s.train)) if int(train_t[i]) in task.classes]
    assert [len(s.train_indices(t)) for t in range(3)] == [8 + 6, 9 + 5, 7 + 10]
    assert [len(s.test_indices(t)) for t in range(3)] == [4, 4, 4]
    seen = [set(s.train_indices(t)) for t in range(3)]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert sum(len(x) for x in seen) == len(s.train)


def test_datasets_yield_task_images():
    s = scenario(num_tasks=3, class_order=[3, 1, 4, 0, 2, 5])
    d = s.train_dataset(1)
    assert len(d) == 14
    items = [d[i] for i in range(len(d))]
    assert {lab for _, lab in items} == {4, 0}
    # the image's first pixel encodes its index in the train set
    assert [int(img[0, 0, 0]) for img, _ in items] == s.train_indices(1)
    te = s.test_dataset(2)
    assert sorted({te[i][1] for i in range(len(te))}) == [2, 5]
    seen = s.seen_test_dataset(1)
    assert len(seen) == 8
    assert sorted({seen[i][1] for i in range(len(seen))}) == [0, 1, 3, 4]
    assert len(s.seen_test_dataset(2)) == len(s.test) == 12
    with pytest.raises(IndexError, match="tasks are 0..2"):
        s.train_dataset(3)


def test_per_class_caps_seeded():
    train = make([100, 100, 100, 100])
    test = make([20, 20, 20, 20])
    s = ClassIncrementalScenario(train, test, num_tasks=2, seed=0, train_per_class=10, test_per_class=3)
    s2 = ClassIncrementalScenario(train, test, num_tasks=2, seed=0, train_per_class=10, test_per_class=3)
    s3 = ClassIncrementalScenario(train, test, num_tasks=2, seed=1, train_per_class=10, test_per_class=3)
    for t in range(2):
        idx = s.train_indices(t)
        assert len(idx) == 20 and idx == sorted(idx)
        labels = train.targets[idx]
        assert torch.bincount(labels, minlength=4)[list(s.tasks[t].classes)].tolist() == [10, 10]
        assert idx == s2.train_indices(t)
        assert len(s.test_indices(t)) == 6
    # the chosen subset of a class does not depend on the class order, only on (seed, class)
    s4 = ClassIncrementalScenario(
        train, test, num_tasks=2, seed=0, train_per_class=10, test_per_class=3, class_order=[3, 2, 1, 0]
    )
    assert sorted(s.train_indices(0) + s.train_indices(1)) == sorted(s4.train_indices(0) + s4.train_indices(1))
    assert s.train_indices(0) != s3.train_indices(0) or s.class_order != s3.class_order
    all0 = sorted(s.train_indices(0) + s.train_indices(1))
    all1 = sorted(s3.train_indices(0) + s3.train_indices(1))
    assert all0 != all1  # another seed, another subset
    # a cap above the class size keeps everything
    big = ClassIncrementalScenario(train, test, num_tasks=2, train_per_class=1000)
    assert len(big.train_indices(0)) == 200


def test_to_dict_json():
    s = ClassIncrementalScenario(
        make(TRAIN6, name="fashion-mnist"), make(TEST6), num_tasks=3, seed=5,
        class_order=[3, 1, 4, 0, 2, 5],
    )
    d = json.loads(json.dumps(s.to_dict()))
    assert d["dataset"] == "fashion-mnist"
    assert d["seed"] == 5 and d["num_tasks"] == 3 and d["classes_per_task"] == 2
    assert d["class_order"] == [3, 1, 4, 0, 2, 5]
    assert d["class_names"] == ["c3", "c1", "c4", "c0", "c2", "c5"]
    assert d["tasks"][1] == {
        "index": 1, "classes": [4, 0], "class_names": ["c4", "c0"], "offset": 2,
        "train_count": 14, "test_count": 4,
    }


def test_size_errors():
    with pytest.raises(DataError, match="set num_tasks or classes_per_task"):
        scenario()
    with pytest.raises(DataError, match="disagree"):
        scenario(num_tasks=2, classes_per_task=2)
    with pytest.raises(DataError, match="num_tasks=7 is more than the 6 classes"):
        scenario(num_tasks=7)
    with pytest.raises(
        DataError, match=r"6 classes cannot be split into 4 equal tasks; num_tasks must divide the 6 classes: "
                         r"choose one of 1, 2, 3, 6$"
    ):
        scenario(num_tasks=4)
    with pytest.raises(DataError, match=r"classes_per_task must divide the 6 classes: choose one of 1, 2, 3, 6$"):
        scenario(classes_per_task=4)
    with pytest.raises(DataError, match="num_tasks=0"):
        scenario(num_tasks=0)
    with pytest.raises(DataError, match="train_per_class=0"):
        scenario(num_tasks=2, train_per_class=0)


def test_class_order_errors():
    with pytest.raises(DataError, match=r"missing ids \[5\]"):
        scenario(num_tasks=2, class_order=[0, 1, 2, 3, 4])
    with pytest.raises(DataError, match=r"duplicate ids \[1\], missing ids \[5\]"):
        scenario(num_tasks=2, class_order=[0, 1, 1, 2, 3, 4])
    with pytest.raises(DataError, match=r"unknown ids \[9\], missing ids \[5\]"):
        scenario(num_tasks=2, class_order=[0, 1, 2, 3, 4, 9])
    with pytest.raises(DataError, match="integer label ids"):
        scenario(num_tasks=2, class_order=[0, 1, 2, 3, 4, 5.5])


def test_missing_images_and_class_mismatch():
    with pytest.raises(DataError, match=r"task 1 \(classes \[2, 3\]\) has no test images of class \[2\] \['c2'\]"):
        ClassIncrementalScenario(make([2, 2, 2, 2]), make([1, 1, 0, 1]), num_tasks=2, shuffle_classes=False)
    with pytest.raises(DataError, match=r"task 0 \(classes \[0, 1\]\) has no train images of class \[0, 1\]"):
        ClassIncrementalScenario(make([0, 0, 2, 2]), make([1, 1, 1, 1]), num_tasks=2, shuffle_classes=False)
    other = TensorImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), [0, 1, 2, 3], list("abcd"))
    with pytest.raises(DataError, match="different classes"):
        ClassIncrementalScenario(make([2, 2, 2, 2]), other, num_tasks=2)


def test_label_range_errors():
    s = scenario(num_tasks=3)
    with pytest.raises(DataError, match=r"label ids must lie in \[0, 6\)"):
        s.position_of(torch.tensor([0, 6]))
    with pytest.raises(DataError, match=r"positions must lie in \[0, 6\)"):
        s.label_of_position([-1])


def test_real_fashion_mnist_scenario():
    try:
        train = load_dataset("fashion-mnist", "train")
        test = load_dataset("fashion-mnist", "test")
    except DataError as exc:
        pytest.skip(f"fashion-mnist files not found: {exc}")
    s = ClassIncrementalScenario(train, test, num_tasks=5, seed=0)
    assert s.class_order == np.random.default_rng(0).permutation(10).tolist()
    assert [len(s.train_indices(t)) for t in range(5)] == [12000] * 5
    assert [len(s.test_indices(t)) for t in range(5)] == [2000] * 5
    capped = ClassIncrementalScenario(train, test, num_tasks=5, seed=0, train_per_class=50, test_per_class=20)
    d = capped.to_dict()
    assert [t["train_count"] for t in d["tasks"]] == [100] * 5
    assert [t["test_count"] for t in d["tasks"]] == [40] * 5
    assert d["class_names"][0] == train.classes[s.class_order[0]]


@pytest.mark.parametrize(
    "counts, kw, message",
    [
        # 5 classes: the valid values were printed as "[1, 5]", which reads like the range 1..5
        ([3] * 5, {"num_tasks": 3}, "5 classes cannot be split into 3 equal tasks; "
                                    "num_tasks must divide the 5 classes: choose one of 1, 5"),
        ([3] * 10, {"num_tasks": 3}, "10 classes cannot be split into 3 equal tasks; "
                                     "num_tasks must divide the 10 classes: choose one of 1, 2, 5, 10"),
        ([3] * 10, {"num_tasks": 20}, "num_tasks=20 is more than the 10 classes; each task needs at least one "
                                      "class, and num_tasks must divide the 10 classes: choose one of 1, 2, 5, 10"),
        ([3] * 5, {"classes_per_task": 2}, "5 classes cannot be split into tasks of 2 classes; "
                                           "classes_per_task must divide the 5 classes: choose one of 1, 5"),
        ([3] * 5, {"classes_per_task": 6}, "classes_per_task=6 is more than the 5 classes; "
                                           "classes_per_task must divide the 5 classes: choose one of 1, 5"),
    ],
)
def test_size_errors_list_every_valid_value(counts, kw, message):
    with pytest.raises(DataError) as err:
        ClassIncrementalScenario(make(counts), make([1] * len(counts)), **kw)
    assert str(err.value) == message
