"""Training: base models (:mod:`.loop` with the methods of :mod:`.methods`: standard, pgd, trades,
gaussian, cat-rs) and the mixing network (:mod:`.mixnet`)."""

from .methods import TRAINING_METHODS, CatrsOptions, TrainContext
from .loop import TrainConfig, clean_accuracy, evaluate_accuracy, train_base

__all__ = ["TrainConfig", "TrainContext", "CatrsOptions", "TRAINING_METHODS", "train_base", "evaluate_accuracy",
           "clean_accuracy"]
