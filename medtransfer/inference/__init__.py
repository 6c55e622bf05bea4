"""Batch prediction over folders."""
from medtransfer.inference.predict import LoadedRun, PredictSummary, load_run, predict_folder

__all__ = ["LoadedRun", "PredictSummary", "load_run", "predict_folder"]
