"""Evaluation metrics of docs/method.md §9: FID, FD-DINOv2, CLIP score, aesthetic score (dgm-eval numerics).

``compute_metrics(gen_paths, ref_paths, captions, ...)`` is the entry point of the evaluation
scripts. Feature extractors and instance metrics are registries by name, so that other modules
(e.g. a toy world with small encoders) can add their own:

    register_feature_extractor("toy", lambda *, device, weights_dir: FeatureExtractor(...))
    compute_metrics(gen, ref, caps, dgm_models=("toy",))  # -> {"fd_toy": ...}

Weights are looked up in ``weights_dir`` (``--metrics_weights_dir``), ``$CMDISTILL_METRICS_WEIGHTS``
and the usual caches before being downloaded from their public sources; see ``weights.py``.
"""

from .compute import (compute_metrics, extract_features, fd_key, image_features, instance_extractor_names,
                      reference_cache_key)
from .extractors import (
    FeatureExtractor,
    clear_loaded_extractors,
    clip_preprocess,
    dinov2_preprocess,
    feature_extractor_names,
    inception_preprocess,
    load_feature_extractor,
    register_feature_extractor,
)
from .frechet import feature_statistics, frechet_distance
from .instance import MetricContext, instance_metric_names, register_instance_metric

__all__ = [
    "compute_metrics", "extract_features", "fd_key", "image_features", "instance_extractor_names",
    "reference_cache_key",
    "FeatureExtractor", "clear_loaded_extractors", "feature_extractor_names", "load_feature_extractor",
    "register_feature_extractor", "inception_preprocess", "dinov2_preprocess", "clip_preprocess",
    "feature_statistics", "frechet_distance",
    "MetricContext", "instance_metric_names", "register_instance_metric",
]
