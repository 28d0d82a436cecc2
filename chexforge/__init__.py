"""chexforge: a command-line factory for labelled synthetic chest X-ray datasets."""

__version__ = "0.1.0"
