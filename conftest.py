"""Every test runs offline (nothing may reach for the Hub) and in the tiny profile."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("LAB_PROFILE", "tiny")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny world's generated pictures live in the storage folder's tiny/; tests that point LAB_STORAGE at a temporary
# folder share one drawing of them instead of drawing them again per test.
os.environ.setdefault("LAB_TINY_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "outputs", "tiny"))
