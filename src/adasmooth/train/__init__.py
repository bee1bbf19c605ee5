"""Training: one engine (:mod:`.engine`) running step functions; base models (:mod:`.loop`, the
config in :mod:`.config`, the methods of :mod:`.methods`) and the mixing network (:mod:`.mixnet`)."""

from .methods import TRAINING_METHODS, CatrsOptions, TrainContext
from .config import TrainConfig
from .loop import clean_accuracy, evaluate_accuracy, train_base

__all__ = ["TrainConfig", "TrainContext", "CatrsOptions", "TRAINING_METHODS", "train_base", "evaluate_accuracy",
           "clean_accuracy"]
