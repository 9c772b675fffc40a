"""Evaluation on the built-in shapes benchmark: an exact image reader, FD features, caption metrics, sweeps.

>>> from mmdiff.eval import score_image, evaluate, sweep
>>> score_image(image, "a small red circle above a large blue square")["correct"]
"""

from .captions import caption_metrics, caption_nll, caption_report, generate_captions
from .detector import ATTRIBUTES, compare_scenes, detect_objects, detected_scene, score_image
from .diversity import diversity_report, layout_descriptor, mean_pairwise_distance, render_prompt
from .features import (
    ShapesFeatureClassifier,
    extract_features,
    frechet_distance,
    load_feature_classifier,
    load_real_scenes,
    rendered_scenes,
    train_feature_classifier,
)
from .run import evaluate, fidelity_report, generate_images
from .sweep import sweep

__all__ = [
    "ATTRIBUTES",
    "ShapesFeatureClassifier",
    "caption_metrics",
    "caption_nll",
    "caption_report",
    "compare_scenes",
    "detect_objects",
    "detected_scene",
    "diversity_report",
    "evaluate",
    "extract_features",
    "fidelity_report",
    "generate_captions",
    "frechet_distance",
    "generate_images",
    "layout_descriptor",
    "load_feature_classifier",
    "load_real_scenes",
    "mean_pairwise_distance",
    "render_prompt",
    "rendered_scenes",
    "score_image",
    "sweep",
    "train_feature_classifier",
]
