"""sae-cxr: transcoder ensembles that make chest X-ray classifiers explain themselves."""

__version__ = "0.1.0"
