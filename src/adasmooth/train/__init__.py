"""Training: base models (standard, pgd, trades, gaussian, cat-rs) and the mixing network."""

from .loop import TRAINING_METHODS, TrainConfig, clean_accuracy, evaluate_accuracy, register_method, train_base

__all__ = ["TrainConfig", "TRAINING_METHODS", "register_method", "train_base", "evaluate_accuracy", "clean_accuracy"]
