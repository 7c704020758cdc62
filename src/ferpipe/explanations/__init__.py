"""Explanations: what the networks look at (saliency), what their filters respond to (filters),
the shared probing helpers (probe), their figures, and Grad-CAM tiles for classify's faces.
Imports model and the base modules."""
