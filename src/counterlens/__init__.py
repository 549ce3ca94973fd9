"""counterlens: explain what a PyTorch classifier bases its decisions on."""
from .attribution import explain
from .errors import CounterlensError
from .model import Classifier, Normalize, RepeatChannels

__version__ = "0.1.0"
__all__ = ["Classifier", "CounterlensError", "Normalize", "RepeatChannels", "explain", "__version__"]
