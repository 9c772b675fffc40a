"""Evaluation on any image-caption data (generic metrics in local feature spaces) and the shapes benchmark.

>>> from mmdiff.eval import score_image, evaluate, sweep
>>> score_image(image, "a small red circle above a large blue square")["correct"]
"""

from .benchmarks.shapes import load_real_scenes
from .benchmarks.shapes.captions import caption_metrics
from .benchmarks.shapes.detector import ATTRIBUTES, compare_scenes, detect_objects, detected_scene, score_image
from .benchmarks.shapes.diversity import diversity_report, layout_descriptor, mean_pairwise_distance, render_prompt
from .caption_metrics import caption_nll, generate_captions
from .metrics import caption_scores, clip_score, frechet_distance, kernel_inception_distance, precision_recall
from .run import caption_report, evaluate, generate_images
from .sweep import sweep

__all__ = [
    "ATTRIBUTES",
    "caption_metrics",
    "caption_nll",
    "caption_scores",
    "clip_score",
    "caption_report",
    "compare_scenes",
    "detect_objects",
    "detected_scene",
    "diversity_report",
    "evaluate",
    "generate_captions",
    "frechet_distance",
    "generate_images",
    "kernel_inception_distance",
    "layout_descriptor",
    "load_real_scenes",
    "mean_pairwise_distance",
    "precision_recall",
    "render_prompt",
    "score_image",
    "sweep",
]
