"""Class order of named labels: which class is positive decides what sensitivity and PPV mean."""
import logging

import pytest

from conftest import toy_binary_npz
from medtransfer.config import load_config
from medtransfer.data.samples import class_order, samples_from_folder
from medtransfer.errors import DataError
from medtransfer.data.datasets import resolve_samples


@pytest.mark.parametrize("names, want", [
    ({"pneumonia", "normal"}, ["normal", "pneumonia"]),
    ({"abnormal", "normal"}, ["normal", "abnormal"]),       # alphabetical would make 'normal' positive
    ({"malignant", "benign"}, ["benign", "malignant"]),
    ({"opacity", "No Finding"}, ["No Finding", "opacity"]),
    ({"tb", "Negative"}, ["Negative", "tb"]),
    ({"cat", "dog", "cow"}, ["cat", "cow", "dog"]),          # no 'nothing found' name: sorted
])
def test_nothing_found_names_come_first(names, want):
    assert class_order(names) == want


def test_explicit_classes_win_and_must_cover_the_labels():
    assert class_order({"normal", "abnormal"}, ["abnormal", "normal"]) == ["abnormal", "normal"]
    with pytest.raises(DataError, match=r"classes \['effusion'\] that data.classes=\['normal', 'pneumonia'\]"):
        class_order({"normal", "effusion"}, ["normal", "pneumonia"])


def _csv(folder, rows):
    path = folder / "labels.csv"
    path.write_text("path,label,patient_id\n" + "".join(f"{p},{lab},{pid}\n" for p, lab, pid in rows))
    return path


def test_csv_names_order_is_logged_and_indices_follow_it(small_demo, tmp_path, caplog):
    files = sorted((small_demo / "images").rglob("*.dcm"))[:4]
    labels = _csv(tmp_path, [(f, lab, f"P{i}") for i, (f, lab) in enumerate(zip(files, ["normal", "abnormal"] * 2))])
    log = logging.getLogger("medtransfer.data.samples")
    log.addHandler(caplog.handler)  # the CLI's logging setup may stop propagation to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="medtransfer.data.samples"):
            table = samples_from_folder(small_demo, labels)
    finally:
        log.removeHandler(caplog.handler)
    assert table.label_names == ["normal", "abnormal"]
    assert [s.label for s in table.samples] == [0, 1, 0, 1]
    assert "1 = abnormal (the positive class" in caplog.text
    table = samples_from_folder(small_demo, labels, classes=["abnormal", "normal"])
    assert [s.label for s in table.samples] == [1, 0, 1, 0]


def test_classes_name_numeric_labels(small_demo, tmp_path):
    files = sorted((small_demo / "images").rglob("*.dcm"))[:2]
    labels = _csv(tmp_path, [(files[0], 0, "A"), (files[1], 1, "B")])
    assert samples_from_folder(small_demo, labels, ["normal", "pneumonia"]).label_names == ["normal", "pneumonia"]
    with pytest.raises(DataError, match="go up to class index 1, but data.classes names 1 classes"):
        samples_from_folder(small_demo, labels, ["normal"])
    npz = tmp_path / "toy.npz"
    toy_binary_npz(npz)
    assert resolve_samples(npz, None, ["normal", "square"]).label_names == ["normal", "square"]
    with pytest.raises(DataError, match="toy.npz has 2 classes but data.classes names 3"):
        resolve_samples(npz, None, ["a", "b", "c"])


def test_config_takes_a_list_of_names():
    assert load_config("xray", overrides=["data.classes=[normal, pneumonia]"]).data.classes == ["normal", "pneumonia"]
    assert load_config("xray").data.classes == []


def test_compare_reads_run_b_at_run_a_positive_class():
    from medtransfer.inference.evaluate import _positive_column

    assert _positive_column(["normal", "abnormal"], ["normal", "abnormal"]) == 1
    assert _positive_column(["normal", "abnormal"], ["abnormal", "normal"]) == 0  # trained with data.classes
    assert _positive_column(["0", "1"], ["no_finding", "opacity"]) == 1  # numeric classes: by index
    with pytest.raises(DataError, match="different classes"):
        _positive_column(["normal", "effusion"], ["normal", "pneumonia"])
