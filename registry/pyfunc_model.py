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

Prompts that are not strings, and requests of more than MAX_REQUEST_CHARS characters, are refused the same way
(the scoring server has no body-size option; the check runs on the parsed body, before tokenising). Bad params
(`num_beams: 0`) raise MlflowException(INVALID_PARAMETER_VALUE) with the message alone: the scoring
server answers 400 with that message and no stack trace.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


MAX_REQUEST_CHARS = 1_000_000  # all prompts of one request together (about 1 MB of ASCII, 3 MB of Chinese UTF-8)


def _texts(model_input: Any) -> list[str]:
    """The prompts, each a string (a number, null or object is refused, not turned into "1", "None", "{}"), in all
    at most MAX_REQUEST_CHARS characters; a CpmantError (answered as a 400) otherwise."""
    from cpmant.errors import CpmantError

    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        texts = model_input[col].tolist()
    elif isinstance(model_input, str):
        texts = [model_input]
    else:
        texts = list(model_input)
    bad = [i for i, x in enumerate(texts) if not isinstance(x, str)]
    if bad:
        kinds = ", ".join(f"#{i}: {type(texts[i]).__name__}" for i in bad[:5])
        raise CpmantError(f"every prompt must be a string; {len(bad)} are not ({kinds})",
                          'send {"inputs": ["a prompt", ...]}')
    total = sum(map(len, texts))
    if total > MAX_REQUEST_CHARS:
        raise CpmantError(f"the request's prompts hold {total:,} characters, more than the {MAX_REQUEST_CHARS:,} "
                          "one request may send", "send shorter prompts: only the last few hundred tokens of each "
                          "are used")
    return texts


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
