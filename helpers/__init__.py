"""The helpers of the T4 Diffusion Lab notebooks, in rooms. A room imports only the rooms above it:

    bootstrap    a fresh Colab VM: Drive's place, the repository record, installing what is missing (stdlib only)
    core         runtime, storage paths and run names, presets, configs, the fp16 rule, whole folders, the run lock
    tiny         the tiny world: small pretrained models, generated pictures, `tiny/<name>` → folder
    models       loading components (fp16 variants, one at a time), encoding prompts and images, pipeline classes
    data         sources, validation, decoding, caches, the training dataset, CLIP embeddings
    generate     pipelines for drawing, seeded generation, variants, grid sheets
    methods      the Method interface and loss; crossattn, lora, ip_adapter, priors; the registry; RunSet
    train        the loop, hooks, checkpoint and resume, optimizer, stops
    evaluation   CLIP score, PickScore, statistics, prompt sets, comparisons → tables
    prior        notebook 04's priors, their metrics, prompt → embedding sources, variations and strips
    plan         the T4 plan: meta-device models, memory phases, calibration, times, inference phases
    proof        the plan measured: every t4 preset × phase on full-size random models (scripts/gpu_proof.py)
    studio       catalog, engine, scoreboard, A/B study, the explorer and the app
    scratch      SD1.5 from scratch in plain PyTorch (notebook 06)

Notebooks import rooms (`from helpers import data, methods, train`) and call what their __init__ lists.
"""
