"""Evaluation for medtransfer: clinical classification and segmentation metrics, plots, reports, model card.

Everything is a plain function (or a small stateful evaluator) that returns values and never prints.
Submodules are imported on first use so that ``import medtransfer.metrics`` stays light::

    from medtransfer.metrics import evaluate_classification, write_classification_report
"""
from __future__ import annotations

from medtransfer.utils.lazy import lazy_exports

from medtransfer.metrics._utils import UndefinedMetricWarning

_EXPORTS: dict[str, str] = {
    # classification
    "roc_auc": "classification",
    "average_precision": "classification",
    "choose_threshold": "classification",
    "binary_metrics_at": "classification",
    "multiclass_metrics": "classification",
    "ordinal_metrics": "classification",
    "quadratic_weighted_kappa": "classification",
    "evaluate_classification": "classification",
    "THRESHOLD_METHODS": "classification",
    # calibration
    "expected_calibration_error": "calibration",
    "reliability_curve": "calibration",
    "fit_temperature": "calibration",
    "apply_temperature": "calibration",
    # statistics
    "binary_auc": "stats",
    "bootstrap_ci": "stats",
    "bootstrap_distribution": "stats",
    "BootstrapCI": "stats",
    "delong_ci": "stats",
    "delong_test": "stats",
    "DeLongResult": "stats",
    "paired_bootstrap_auc_diff": "stats",
    "roc_points": "stats",
    "PairedBootstrapResult": "stats",
    # segmentation
    "dice_per_label": "segmentation",
    "hd95_per_label": "segmentation",
    "nsd_per_label": "segmentation",
    "segmentation_metrics": "segmentation",
    "evaluate_segmentation": "segmentation",
    "SegmentationEvaluator": "segmentation",
    # plots
    "plot_roc": "plots",
    "roc_curve_band": "plots",
    "plot_precision_recall": "plots",
    "plot_reliability": "plots",
    "plot_confusion_matrix": "plots",
    "plot_learning_curves": "plots",
    "load_history": "plots",
    "plot_segmentation_overlay": "plots",
    # reports
    "write_model_card": "model_card",
    "render_model_card": "model_card",
    "write_classification_report": "report",
    "write_segmentation_report": "report",
    "write_html_report": "html_report",
    "render_html_report": "html_report",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["UndefinedMetricWarning", *_EXPORTS]
