"""Mixing: Eq. 3.4 and its variants, the fixed-alpha and the adaptive mixed classifiers."""

from .fixed import R_OPTIONS, MixedClassifier, MixedModel, MixOutput, dual_norm, mix_log_probs, mix_logits

__all__ = ["MixOutput", "MixedModel", "mix_log_probs", "mix_logits", "MixedClassifier", "R_OPTIONS", "dual_norm"]
