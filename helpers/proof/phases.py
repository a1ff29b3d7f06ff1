"""One preset, phase by phase, through helpers' own code (`PresetProof`), beside the plan's number for each phase
(`planned`); the whole proof over every t4 preset is helpers.proof.run."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

from ..core.presets import Preset, get_preset
from ..data.dataset import prepare_dataset
from ..data.embeddings import embedding_set
from ..generate.sampling import generate, prompt_seed_pairs
from ..methods.ip_adapter import EmbeddedDataset
from ..methods.priors import ADAPTER_PRESET
from ..models import on_device, pipeline_from_components, release_cuda_cache
from ..plan.inference import SCORE_BATCH, scoring_room_gib, scoring_seconds
from ..plan.meta import weights_gib
from ..plan.model import (
    CUDA_OVERHEAD_GIB,
    PRIOR_METHODS,
    prior_training_plan,
    training_plan,
)
from ..plan.timing import caching_seconds, generation_seconds, prior_training_seconds, training_estimate
from ..prior.images import prior_image_embeds
from ..prior.priors import train_prior
from ..train.hooks import ExportHook
from ..train.loop import Trainer
from .device import Meter, StepClock, is_oom
from .world import (
    World,
    proof_preset,
    random_components,
    storage,
)

# ---------------------------------------------------------------- the plan's numbers for each phase

def planned(preset: Preset) -> dict[str, dict]:
    """Per phase of the t4 `preset`: the plan's GiB (helpers.plan.model, before the error band) and seconds per unit
    on a T4 (helpers.plan.timing), with the unit and, for the checkpoint, its MB. Loading is the plan's loaded weights
    without the CLIP of notebook 04, which the caching phase loads (helpers.data.embeddings.embedding_set)."""
    prior = preset.method in PRIOR_METHODS
    plan = (prior_training_plan if prior else training_plan)(preset)
    ph = plan["phases_gib"]
    scoring_gib = weights_gib("clip") + scoring_room_gib("clip") + CUDA_OVERHEAD_GIB  # notebook 05's clip phase
    if prior:
        loading = plan["adapter_loaded_gib"] - plan["parts_gib"]["clip"]
        per_step = prior_training_seconds(preset) / preset.max_steps
        adapter = get_preset(ADAPTER_PRESET, "t4")
        per_image = generation_seconds(adapter.family, adapter.resolution, 1)
        family, resolution = adapter.family, adapter.resolution
    else:
        loading = plan["weights_gib"] - plan["parts_gib"]["clip"] + CUDA_OVERHEAD_GIB
        per_step = training_estimate(preset)["seconds_per_step"]
        family, resolution = preset.family, preset.resolution
    return {"loading": {"gib": loading, "unit": None, "per_unit": None},
            "caching": {"gib": ph["caching"], "unit": "image", "per_unit": caching_seconds(preset, 1)},
            "training": {"gib": ph["training"], "unit": "step", "per_unit": per_step},
            "checkpoint": {"gib": ph["training"], "unit": None, "per_unit": None, "mb": plan["checkpoint_mb"]},
            "sampling": {"gib": ph["sampling"], "unit": "image", "family": family, "resolution": resolution,
                         "seconds_per_denoising_step": generation_seconds(family, resolution, 1)},
            "scoring": {"gib": scoring_gib, "unit": "image", "per_unit": scoring_seconds("clip", 1)}}



class PresetProof:
    """Measures the phases of one t4 preset in order and hands each row to `write` as soon as it is measured."""

    def __init__(self, name: str, world: World, meter: Meter, write, plan: dict | None = None):
        self.t4 = get_preset(name, "t4")
        self.world, self.meter, self.write = world, meter, write
        self.plan = copy.deepcopy(plan or planned(self.t4))
        self.failed: str | None = None
        self.s: dict = {}  # what the phases hand on: components, dataset, trainer, images, ...

    def measure(self, phase: str, run) -> None:
        """Run `run()` (→ what the row says about units and work) as `phase`, and write its row."""
        plan = self.plan[phase]
        row = {"preset": self.t4.name, "phase": phase, "planned_gib": plan["gib"], "unit": plan.get("unit"),
               "planned_per_unit": plan.get("per_unit")}
        if self.failed is not None:
            self.write({**row, "status": f"not reached ({self.failed})"})
            return
        self.meter.start()
        try:
            info = run() or {}
        except Exception as e:  # noqa: BLE001  every failure is a row: out of memory is a measurement
            memory, oom = self.meter.stop(), is_oom(e)
            status = "out of memory under the cap" if oom else f"error: {type(e).__name__}: {str(e)[:300]}"
            self.failed = f"{phase} {'ran out of memory' if oom else 'failed'}"
            print(f"{self.t4.name} {phase}: {status}")
            e = None
            self.s.clear()
            release_cuda_cache()
            self.write({**row, **memory, "status": status})
            return
        memory = self.meter.stop()
        self.write({**row, **memory, **info, "status": "measured"})

    # ---- pipeline presets: crossattn, lora, ip_adapter
    def run(self) -> None:
        if self.t4.method in PRIOR_METHODS:
            return self.run_prior()
        world, s = self.world, self.s
        p = s["preset"] = proof_preset(self.t4, world)
        self.measure("loading", lambda: self.loading(p))
        self.measure("caching", lambda: self.caching(p))
        self.measure("training", lambda: self.training(p))
        self.measure("checkpoint", lambda: self.checkpoint(p))
        self.measure("sampling", lambda: self.sampling(p))
        self.measure("scoring", lambda: self.scoring())
        s.clear()
        release_cuda_cache()

    def loading(self, p: Preset) -> dict:
        self.s["components"] = random_components(p, self.world.configs, self.world.device)
        c = self.s["components"]
        parts = [c.unet, c.vae, *c.text_encoders]
        return {"what": f"{len(parts)} modules, {sum(m.num_parameters() for m in parts) / 1e9:.2f}B parameters"}

    def caching(self, p: Preset) -> dict:
        c, root = self.s["components"], storage(self.world, p)
        dataset = prepare_dataset(p, c, root=root)
        if p.clip_model:
            es = embedding_set(p, device=self.world.device, records=dataset.records, root=root)
            dataset = EmbeddedDataset(dataset, es)
        self.s["dataset"] = dataset
        n = len(dataset.records) if hasattr(dataset, "records") else len(dataset)
        images = len(getattr(dataset, "dataset", dataset).records)
        return {"count": images, "measured_per_unit": self.meter_seconds() / images,
                "what": f"{images} pictures at {p.resolution} px ({n} train)"}

    def meter_seconds(self) -> float:
        self.meter.sync()
        return time.perf_counter() - self.meter.t0

    def trainer(self, p: Preset, steps: int, hooks: list) -> Trainer:
        preset = replace(p, max_steps=steps)
        return Trainer(preset, self.s["components"], self.s["dataset"], storage(self.world, p) / "run", hooks=hooks)

    def training(self, p: Preset) -> dict:
        clock = StepClock(self.meter)
        trainer = self.s["trainer"] = self.trainer(p, p.max_steps, [clock])
        state = trainer.run()
        return {"count": state.step, "measured_per_unit": clock.seconds_per_step(),
                "what": f"{state.step} steps × {p.images_per_step} images at {p.resolution} px "
                        f"(batch {p.batch_size} × {p.grad_accum}), {type(trainer.optimizer).__name__}, "
                        f"setup {clock.setup_seconds:.1f} s"}

    def checkpoint(self, p: Preset) -> dict:
        trainer = self.s.pop("trainer")
        t0 = time.perf_counter()
        folder = trainer.save_checkpoint()
        saved = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        trainer = None  # its optimizer state goes; the new Trainer loads it back
        release_cuda_cache()
        clock = StepClock(self.meter)
        again = self.s["trainer"] = self.trainer(p, p.max_steps + 1, [clock])
        again.run()
        if again.state.resumed_from != folder.name:
            raise RuntimeError(f"resumed from {again.state.resumed_from}, not {folder.name}")
        return {"measured_mb": mb, "planned_mb": self.plan["checkpoint"]["mb"],
                "what": f"saved {folder.name} in {saved:.1f} s ({mb:.1f} MB); a new Trainer resumed from it in "
                        f"{clock.setup_seconds:.1f} s and trained step {again.state.step}"}

    def sampling(self, p: Preset) -> dict:
        trainer, c = self.s["trainer"], self.s["components"]
        prompts, seeds = prompt_seed_pairs(list(p.sample_prompts), [0])
        c.unet.eval()
        try:
            with on_device([*c.text_encoders, c.vae], self.world.device):  # as helpers.train.hooks.SampleHook
                pipe = pipeline_from_components(c)
                embeds = (trainer.method.sample_image_embeds(trainer, prompts, seeds)
                          if trainer.method.needs_image_embeds else None)
                images, seconds = self.draw(pipe, p, prompts, seeds, embeds)
        finally:
            c.unet.train()
        return self.drawn(p, images, prompts, seconds, p.family)

    def draw(self, pipe, p: Preset, prompts, seeds, embeds) -> tuple[list, float]:
        self.meter.sync()
        t0 = time.perf_counter()
        images = generate(pipe, prompts, seeds, steps=p.sample_steps, height=p.resolution, width=p.resolution,
                          image_embeds=embeds)
        self.meter.sync()
        return images, time.perf_counter() - t0

    def drawn(self, p: Preset, images: list, prompts: list, seconds: float, family: str) -> dict:
        self.s["images"], self.s["prompts"] = images, prompts
        plan = self.plan["sampling"]
        self.plan["sampling"]["per_unit"] = plan["seconds_per_denoising_step"] * p.sample_steps
        return {"count": len(images), "measured_per_unit": seconds / len(images),
                "planned_per_unit": plan["per_unit"],
                "what": f"{len(images)} images of {family} at {p.resolution} px, {p.sample_steps} steps each"}

    def scoring(self) -> dict:
        images, prompts = self.s["images"], self.s["prompts"]
        scorer = self.s.get("scorer")
        for key in [k for k in self.s if k not in ("images", "prompts", "scorer")]:
            del self.s[key]  # the run leaves before the scorer works, as in notebook 05
        release_cuda_cache()
        scorer = scorer or self.world.scorer()
        n = len(images) if self.world.smoke else SCORE_BATCH
        batch = [images[i % len(images)] for i in range(n)]
        texts = [prompts[i % len(prompts)] for i in range(n)]
        self.meter.sync()
        t0 = time.perf_counter()
        scores = scorer.score(batch, texts, batch_size=SCORE_BATCH)
        self.meter.sync()
        seconds = time.perf_counter() - t0
        if not all(math.isfinite(x) for x in scores):
            raise RuntimeError(f"non-finite CLIP scores {scores[:4]}")
        return {"count": n, "measured_per_unit": seconds / n,
                "what": f"{scorer.name}, {scorer.precision.open_clip_precision}, {n} images in one batch"}

    # ---- priors: on top of the image-conditioned SD1.5 they draw through
    def adapter(self) -> None:
        """notebook 04's image-conditioned SD1.5 as its first part leaves it: components with the IP-Adapter and LoRA
        set up, trained one step (optimizer state resident), its CLIP released; text encoders and VAE on the device.
        Not measured: the prior presets' plan starts from it."""
        adapter = proof_preset(get_preset(ADAPTER_PRESET, "t4"), self.world, steps=1)
        c = self.s["components"] = random_components(adapter, self.world.configs, self.world.device)
        root = storage(self.world, adapter) / self.t4.name
        dataset = prepare_dataset(adapter, c, root=root)
        es = embedding_set(adapter, device=self.world.device, records=dataset.records, root=root)
        self.s["dataset"] = EmbeddedDataset(dataset, es)
        trainer = Trainer(adapter, c, self.s["dataset"], root / "run", hooks=[])
        trainer.run()
        es.release()
        for module in (*c.text_encoders, c.vae):
            module.to(self.world.device)
        self.s["adapter_trainer"], self.s["adapter"] = trainer, adapter

    def run_prior(self) -> None:
        world, s = self.world, self.s
        p = s["preset"] = proof_preset(self.t4, world)
        print(f"{self.t4.name}: loading and training one step of {ADAPTER_PRESET}, the SD1.5 the prior draws through")
        self.measure("loading", lambda: self.adapter() or {
            "what": f"{ADAPTER_PRESET} (SD1.5 + IP-Adapter + LoRA after one step, optimizer state; text encoders "
                    f"and VAE on the device)"})
        self.measure("caching", lambda: self.prior_caching(p))
        self.measure("training", lambda: self.prior_training(p))
        self.measure("checkpoint", lambda: self.prior_checkpoint(p))
        self.measure("sampling", lambda: self.prior_sampling(p))
        self.measure("scoring", lambda: self.scoring())
        s.clear()
        release_cuda_cache()

    def prior_caching(self, p: Preset) -> dict:
        es = self.s["embeddings"] = embedding_set(p, device=self.world.device, root=storage(self.world, p))
        return {"count": len(es), "measured_per_unit": self.meter_seconds() / len(es),
                "what": f"CLIP embeddings of {len(es)} pictures ({len(es.train_indices)} train)"}

    def prior_training(self, p: Preset) -> dict:
        clock = StepClock(self.meter)
        prior, trainer = train_prior(p, self.s["embeddings"], storage(self.world, p) / "run",
                                     hooks=[clock, ExportHook()], device=self.world.device)
        self.s["trainer"], self.s["prior"] = trainer, prior
        return {"count": trainer.state.step, "measured_per_unit": clock.seconds_per_step(),
                "what": f"{trainer.state.step} steps × {p.batch_size} pairs, {type(trainer.optimizer).__name__}, "
                        f"export and load_prior included"}

    def prior_checkpoint(self, p: Preset) -> dict:
        trainer = self.s.pop("trainer")
        t0 = time.perf_counter()
        folder = trainer.save_checkpoint()
        saved = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        trainer = None
        self.s.pop("prior")
        release_cuda_cache()
        clock = StepClock(self.meter)
        prior, again = train_prior(replace(p, max_steps=p.max_steps + 1), self.s["embeddings"],
                                   storage(self.world, p) / "run", hooks=[clock, ExportHook()],
                                   device=self.world.device)
        if again.state.resumed_from != folder.name:
            raise RuntimeError(f"resumed from {again.state.resumed_from}, not {folder.name}")
        self.s["trainer"], self.s["prior"] = again, prior
        return {"measured_mb": mb, "planned_mb": self.plan["checkpoint"]["mb"],
                "what": f"saved {folder.name} in {saved:.1f} s ({mb:.1f} MB); train_prior resumed from it in "
                        f"{clock.setup_seconds:.1f} s, trained step {again.state.step}, exported"}

    def prior_sampling(self, p: Preset) -> dict:
        adapter, c = self.s["adapter"], self.s["components"]
        self.s["scorer"] = self.world.scorer()  # notebook 04 compares the pictures with it: the plan has it loaded
        prompts, seeds = prompt_seed_pairs(list(p.sample_prompts), [0])
        embeds = prior_image_embeds(self.s["prior"], self.s["embeddings"])(prompts, seeds)
        c.unet.eval()
        pipe = pipeline_from_components(c)
        images, seconds = self.draw(pipe, replace(adapter, sample_steps=p.sample_steps), prompts, seeds, embeds)
        return self.drawn(replace(adapter, sample_steps=p.sample_steps), images, prompts, seconds, adapter.family)
