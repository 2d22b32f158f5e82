"""Generation parameters of the pyfunc model (its predict params), with their defaults."""

DEFAULT_PARAMS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "num_beams": 1,
                  "repetition_penalty": 1.2, "seed": 0}
