"""Batch prediction over folders, and evaluation of trained runs on new labelled data."""
from medtransfer.inference.predict import PredictSummary, predict_folder
from medtransfer.run import LoadedRun, load_run

__all__ = ["LoadedRun", "PredictSummary", "load_run", "predict_folder"]
