"""Evaluation used by the demo: OCR character error rate per corruption level, video QA accuracy, and the
equal-token-budget comparison of the 3D resampler (several frames per package) with the 2D one (one frame each)."""

from vlmcook.eval.metrics import (accuracy, cer, edit_distance, normalize_answer,  # noqa: F401
                                  wilson_interval)
