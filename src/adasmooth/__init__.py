"""adasmooth: adaptive smoothing of a standard and a robust classifier.

    h_alpha(x) = log((1 - alpha) * softmax(g(x)) + alpha * softmax(h(x)))
"""

from .mixing import MixedClassifier, MixOutput, mix_logits
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["MixedClassifier", "MixOutput", "mix_logits", "create_model", "list_models", "__version__"]
