"""Drawing: inference pipelines loaded the way training loads them, seeded generation (the same starting noise for
every variant), Variants (base or a run at a scale) and grid sheets a person can read.
"""
from .grids import comparison_sheets, image_grid, thumbnail_sheet
from .sampling import ImageEmbeds, Variant, generate, generate_variants, images_per_call, load_pipeline, read_manifest
