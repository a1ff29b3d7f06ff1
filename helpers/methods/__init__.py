"""What trains and how a run leaves and comes back: the Method interface (what trains, its loss, what idles,
whether its runs draw, its export) with the denoising loss (diffusion), the methods (crossattn, lora, ip_adapter,
priors) and their registry written out (registry), and RunSet, which loads finished runs into ONE stock pipeline
and switches them per variant (runs).
"""
from .crossattn import CROSSATTN_FILE, load_crossattn_weights
from .ip_adapter import IP_ADAPTER_FILE, EmbeddedDataset, round_trip_delta
from .lora import LORA_FILE, kohya_path, where_files_go
from .method import Method
from .registry import METHODS, make_method, method_class
from .runs import RunSet, finished_runs, is_finished, load_snippet, run_preset
