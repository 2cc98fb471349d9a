"""cxr: distributed chest X-ray pneumonia screening on Ray."""

__version__ = "0.1.0"
