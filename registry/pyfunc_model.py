"""The MLflow pyfunc model of a CPM-Ant checkpoint, logged as code (models-from-code): no pickled object.

Its only artifact is the checkpoint folder (safetensors, config.json, vocab.txt, metadata). A delta version's
artifact is its delta folder: loading composes it with the base version its delta_config.json names, fetched from
the registry (`registry.pulling.load_model`). `predict` takes the prompts and returns their continuations; its
params are `cpmant.generation_config.GenerationConfig`'s fields (`precision`: auto | fp32 | bf16, auto = fp32 on
the CPU, see cpmant/generate.py).

The input's type hint is `pd.DataFrame` because that is what MLflow hands over: the logged signature is
column-based (one string column, see registry/register.py), so MLflow turns a list of prompts into a one-column
DataFrame before `predict`. A DataFrame hint also keeps that signature (a `list[str]` hint would make MLflow infer
one from the hint and the input example instead) and silences MLflow's warning about missing type hints. A plain
list or a str, as a direct caller may pass, is accepted too.

Bad params (`num_beams: 0`) raise MlflowException(INVALID_PARAMETER_VALUE) with the message alone: the scoring
server answers 400 with that message and no stack trace.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _texts(model_input: Any) -> list[str]:
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in model_input]


class CPMAntPyfunc(PythonModel):
    def load_context(self, context):
        # a plain checkpoint loads as is; a delta is composed with the base its delta_config.json names, pulled
        # from the registry (MLFLOW_TRACKING_URI / CPMANT_HOME) through the verified cache
        from registry.pulling import load_model

        self.model, self.tokenizer = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from cpmant.errors import CpmantError
        from cpmant.generate import GenerationConfig, generate

        try:
            config = GenerationConfig.from_params(params)
            return generate(self.model, self.tokenizer, _texts(model_input), config)
        except CpmantError as e:  # bad params or input: the message only, as a 400 (no traceback)
            message = e.problem if e.fix is None else f"{e.problem} (fix: {e.fix})"
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE) from None

    def predict_stream(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """One prompt's continuation in pieces as tokens come (MLflow's PythonModel.predict_stream)."""
        from cpmant.errors import CpmantError
        from cpmant.generate import GenerationConfig, generate_stream

        try:
            config = GenerationConfig.from_params(params)
            texts = _texts(model_input)
            if len(texts) != 1:
                raise CpmantError(f"predict_stream continues one prompt, got {len(texts)}", "send one prompt")
            yield from generate_stream(self.model, self.tokenizer, texts[0], config)
        except CpmantError as e:
            message = e.problem if e.fix is None else f"{e.problem} (fix: {e.fix})"
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(CPMAntPyfunc())
