"""Model outputs over labelled loaders and the report they make: shared by training (validation,
the final evaluation) and by ``evaluate`` / ``compare`` on new data."""
from medtransfer.evaluation.loop import labelled_results, predict_loader, selection_auc
from medtransfer.evaluation.report import write_evaluation

__all__ = ["labelled_results", "predict_loader", "selection_auc", "write_evaluation"]
