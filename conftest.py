"""Every test runs offline (nothing may reach for the Hub) and in the tiny profile."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("LAB_PROFILE", "tiny")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
