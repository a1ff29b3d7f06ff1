"""The T4 plan, before anything loads: the real architectures on the meta device (meta) and their live-tensor peaks
(live), the memory model of a run phase by phase (model), its error band from published reports (calibration), the
verdict per preset (memory), times from two published anchors (timing), and what notebook 05, the explorer and the
app hold on the GPU (inference).
"""
from .calibration import calibration_text, error_band
from .inference import plan_text
from .memory import estimate_vram, memory_plan_table
from .meta import crossattn_parameter_count, full_size_unet
from .model import COLAB_RAM_GIB, MARGIN_GIB, T4_USABLE_GIB
from .timing import generation_seconds, prior_training_seconds, run_time_plan, span, training_estimate
