"""Training data: sources (CIFAR-10 with caption templates, the Naruto BLIP captions, your folder), every file checked
before training (validation → a ValidationReport), images and captions decoded the way training sees them, the
latent / text caches (caches), the training dataset (dataset: `prepare_dataset`) and notebook 04's CLIP embedding
cache (embeddings).
"""
from .caches import cache_latents, cache_text
from .captions import caption_length_figure, caption_token_lengths
from .dataset import TrainDataset, TrainTransform, cache_summary, describe_item, prepare_dataset
from .embeddings import (
    ClipEncoder,
    EmbeddingSet,
    cosine_matrix,
    embedding_set,
    nearest_rows,
    nearest_true_embeds,
    slerp,
)
from .images import preview_grid
from .report import DatasetError, ValidationReport
from .sources import fill_template, load_preset_records, load_source, with_source
from .validation import Record, validate
