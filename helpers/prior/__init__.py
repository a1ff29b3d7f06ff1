"""Notebook 04's workflow around CLIP image embeddings: training, loading and sampling priors (priors), their
DALLE2-pytorch metrics (metrics), prompt → image-embedding sources for the image-conditioned SD1.5 (images) and
pictures drawn back from embeddings: held-out checks, variations, interpolation strips (variations).
"""
from .images import (
    caption_only,
    comparison_variants,
    fixed_embeddings,
    held_out_prompts,
    prompt_ends,
    prompt_source,
)
from .metrics import prior_metrics
from .priors import Prior, finished_priors, load_prior, train_prior
from .variations import Ends, held_out_check, interpolations, spread_held_out, variations
