"""The winner of a study: rebuilt and scored on the test images, exported as one Keras
model, used to predict, fine-tuned.

Never imports the sweep loop back.
"""

from __future__ import annotations

from ._export import Registration, build_export_model, check_output, export, save_model
from ._finetune import FinetuneResult, run_finetune
from ._finetune_files import clear_side, folder_bytes, side_folders
from ._predict import find_files, predict
from ._rebuild import Winner, evaluate_and_log

__all__ = [
    "FinetuneResult",
    "Registration",
    "Winner",
    "build_export_model",
    "check_output",
    "clear_side",
    "evaluate_and_log",
    "export",
    "find_files",
    "folder_bytes",
    "predict",
    "run_finetune",
    "save_model",
    "side_folders",
]
