"""Generation parameters of the pyfunc model (its predict params), with their defaults: those of
`cpmant.generation_config.GenerationConfig`, the one home of the generation settings."""

from cpmant.generation_config import GenerationConfig

DEFAULT_PARAMS: dict = GenerationConfig().to_params()
