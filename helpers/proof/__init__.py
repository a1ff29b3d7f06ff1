"""The plan measured (a room after plan/, which it measures): every phase of every `t4` preset run through helpers' own code on FULL-SIZE architectures with
random weights, on a CUDA GPU made to behave like a T4 for memory, with what it held and how long it took written
beside what the plan says (scripts/gpu_proof.py is the command; README, "Measuring on a GPU").

The device (`t4_settings`): the caching allocator capped at a T4's 14.74 GiB less this process's CUDA context (as
`torch.cuda.mem_get_info` measures it before any tensor), scaled-dot-product attention limited to the
memory-efficient and math kernels (a T4 has neither flash nor cuDNN attention), TF32 off, cudnn.benchmark off. Under
these settings what a phase allocates barely depends on the card; how long it takes does, so the report keeps the two
apart, and only memory is fit to calibrate the plan (helpers.plan.calibration's error band, which today rests on
published reports: a committed GPU report is what it is to be recalibrated from).

The models (`random_components`): the real configs of helpers.core.configs built directly on the device in fp16 (the
stock SDXL VAE in fp32 where its config says force_upcast), never a full copy on the host, with the tiny world's
tokenizer (its ids fit the real 49,408-token vocabulary) and the real noise schedules. The CLIP of notebook 04 is
written once to a folder (ClipEncoder loads from a folder), the scorer is open_clip's ViT-L-14 with random weights.

The phases of a preset, each one helpers' own path (`PHASES`):
  loading     the components on the device (for a prior: the image-conditioned SD1.5 it draws through, loaded)
  caching     helpers.data.prepare_dataset (validation, latent and text caches) and, with a CLIP, embedding_set
  training    helpers.train.Trainer for `steps` optimizer steps (the preset's own batch and accumulation)
  checkpoint  Trainer.save_checkpoint, then a new Trainer on the same run resuming from it for one more step
  sampling    helpers.generate.sampling.generate through pipeline_from_components with the training state resident
              (a prior: its predictions through the adapter's pipeline, the scorer loaded beside, as the plan says)
  scoring     helpers.evaluation.ClipScorer in fp16 on a batch of SCORE_BATCH images, the run freed first
A phase that runs out of memory under the cap is written as measured (its peak is the cap) and the preset's later
phases as not reached. Rows are written as they are measured, so a run cut short keeps what it had.

Without CUDA (`smoke=True`) the same functions run on the CPU in the T4-dtype mode (helpers.core.precision) on the
real configs with every width divided by 8 (`proof_configs`), at small resolutions and batches (`proof_preset`); the
memory is then the process's peak resident set (VmHWM), not a GPU's, and the rows say "CPU smoke".
"""
from .device import Meter, t4_settings
from .phases import PresetProof, planned
from .report import Report, report_markdown
from .run import run_proof
from .tiny_world import tiny_world_proof
from .world import (
    FIRST,
    PHASES,
    SMOKE_CLIP_IMAGE,
    SMOKE_DIVISOR,
    SMOKE_TOKENS,
    World,
    proof_configs,
    random_components,
)
