"""The tiny world of the `tiny` profile: the small models' architectures and the committed pretrained weights
(world, helpers/tiny/assets/), the generated pictures (pictures), and `resolve`, which turns `tiny/<name>` into the
folder every from_pretrained and dataset loader reads.
"""
from .world import MODELS, TOKENIZER_DIR, WORLD_DIR, build_all, resolve, tokenizer
