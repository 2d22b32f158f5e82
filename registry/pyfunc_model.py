"""The MLflow pyfunc model of a CPM-Ant checkpoint, logged as code (models-from-code): no pickled object.

Its only artifact is the checkpoint folder (safetensors, config.json, vocab.txt, metadata). `predict` takes a list
of prompts (or a DataFrame with a `text` column) and returns their continuations.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from registry.params import DEFAULT_PARAMS


class CPMAntPyfunc(PythonModel):
    def load_context(self, context):
        from cpmant.checkpoint import load_pretrained

        self.model, self.tokenizer = load_pretrained(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        from cpmant.generate import generate

        if hasattr(model_input, "columns"):  # pandas DataFrame
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = [str(x) for x in model_input[col].tolist()]
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = [str(x) for x in model_input]
        p = {**DEFAULT_PARAMS, **(params or {})}
        return generate(self.model, self.tokenizer, texts, max_new_tokens=int(p["max_new_tokens"]),
                        temperature=float(p["temperature"]), top_k=int(p["top_k"]), top_p=float(p["top_p"]),
                        repetition_penalty=float(p["repetition_penalty"]), num_beams=int(p["num_beams"]),
                        seed=int(p["seed"]))


mlflow.models.set_model(CPMAntPyfunc())
