"""Evaluation: scores of the trained networks on validation and test (scores) and the CNN's
calibration (calibration). Imports data, model and the base modules."""
