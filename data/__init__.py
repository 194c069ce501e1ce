"""Text in and out of the model, and the data the method starts from.

- `data.tokenizer`: the checkpoint's own tokenizer and chat template.
- `data.default_model`: the embedded default model, fetched and converted on first use.
- `data.dataset`: dual-dataset records to training tensors.
- `data.prompts`: the seed loader and every prompt text the model is shown.
- `seeds.json`, `eval_*.jsonl`, `dev_*.jsonl`, `span_gold.jsonl`: the human annotations, the
  held-out and development prompt sets, and the hand-marked harmful words.

Nothing here imports a module outside `data` and `common` (the utilities every layer uses).
"""

from pathlib import Path

from data.tokenizer import Tokenizer

DATA_DIR = Path(__file__).resolve().parent  # seeds, prompt sets and the prompt texts live here

__all__ = ["DATA_DIR", "Tokenizer", "default_model_path"]


def __getattr__(name):
    # Imported on first use, so `python -m data.default_model` does not import itself twice.
    if name == "default_model_path":
        from data.default_model import default_model_path

        return default_model_path
    raise AttributeError(name)
