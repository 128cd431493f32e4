"""Tests may import the random-weight pipelines from here too (they live in sdlens.models.families)."""

from sdlens.models.families import FAMILIES, sd1, sd2, sd3, sd15_layout, sd15_layout_unet, sdxl  # noqa: F401
