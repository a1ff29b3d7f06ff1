"""Drawing for people: the catalog of base models and finished runs (catalog), requests and their one-sentence
refusals (drawing), the UI-free engine that draws them (engine), notebook 05's scoreboard and the blind A/B study,
and the two faces: the ipywidgets explorer and the Gradio app (app: imported on its own, it loads gradio).
"""
from .catalog import Catalog
from .drawing import Request, RequestError
from .engine import Engine
from .explorer import Explorer, StudyPanel
from .scoreboard import TINY_COUNTS, evaluate_runs, t4_plan
from .study import Study
