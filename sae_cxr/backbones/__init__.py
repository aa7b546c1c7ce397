"""Backbones: one interface (base.py), BiomedCLIP through open_clip, and the phantom model."""

from sae_cxr.backbones.base import Backbone, ImageEncoding, Letterbox, load_backbone  # noqa: F401
