"""The pyfunc model under MLflow's own scoring server (in process): params validated against GenerationConfig,
a bad request answered with its message and no stack trace, no warning about `predict` type hints, the logged
signature's params and defaults those of GenerationConfig."""

import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def served(tmp_path_factory, fixture_corpus):
    """A micro checkpoint saved as the registry logs it (same code file, signature and example), loaded back and
    put behind MLflow's scoring app with a test client."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from cpmant.checkpoint import save_model_dir
    from cpmant.config import ModelConfig
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import build_vocab
    from registry.register import PYFUNC_CODE, model_signature

    tmp = tmp_path_factory.mktemp("pyfunc")
    vocab = build_vocab((fixture_corpus / "poems.txt").read_text(encoding="utf-8").splitlines(), 600,
                        tmp / "vocab.txt")
    cfg = ModelConfig(vocab_size=600, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=16,
                      position_bias_num_buckets=16, position_bias_max_distance=64, prompt_types=4, prompt_length=4,
                      segment_types=4)
    torch.manual_seed(0)
    ckpt = save_model_dir(tmp / "ckpt", CPMAnt(cfg).state_dict(), cfg, vocab)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.save_model(
            tmp / "model", python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(ckpt)},
            signature=model_signature(),
            input_example=(["床前明月光"], {"max_new_tokens": 1}),
        )
        model = mlflow.pyfunc.load_model(str(tmp / "model"))
    return model, TestClient(scoring_server.init(model)), [str(w.message) for w in caught]


def _post(client, body):
    return client.post("/invocations", content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_no_type_hint_warning_and_signature_kept(served):
    from cpmant.generation_config import GenerationConfig

    model, _, caught = served
    assert not [m for m in caught if "type hint" in m], caught
    params = {p.name: p.default for p in model.metadata.signature.params.params}
    assert params == GenerationConfig().to_params()


def test_served_request_generates(served):
    _, client, _ = served
    r = _post(client, {"inputs": ["床前明月光", "白日依山尽"], "params": {"max_new_tokens": 3, "num_beams": 2}})
    assert r.status_code == 200, r.text
    out = r.json()["predictions"]
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    for precision in ("bf16", "fp32"):  # the precision param reaches generate (bf16 autocast on the CPU works)
        r = _post(client, {"inputs": ["床前明月光"], "params": {"max_new_tokens": 2, "precision": precision}})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("params,says", [
    ({"num_beams": 0}, "num_beams=0 (allowed: an integer >= 1"), ({"top_p": 2.0}, "top_p=2.0 (allowed"),
    ({"temperature": -1.0}, "temperature=-1.0 (allowed"), ({"num_beams": 2, "temperature": 0.7}, "does not sample"),
    ({"max_new_tokens": 100}, "max_new_tokens 100 leaves no room"),
    ({"precision": "fp16"}, "precision='fp16' (allowed: auto | fp32 | bf16"),
])
def test_bad_params_answer_the_message_only(served, params, says):
    _, client, _ = served
    r = _post(client, {"inputs": ["床前明月光"], "params": params})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and says in body["message"]
    assert "stack_trace" not in body and "Traceback" not in r.text


def test_predict_raises_mlflow_invalid_parameter(served):
    from mlflow.exceptions import MlflowException

    model, _, _ = served
    with pytest.raises(MlflowException) as e:
        model.predict(["床前明月光"], params={"num_beams": 0})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "num_beams=0" in e.value.message
    assert len(model.predict(["床前明月光"], params={"max_new_tokens": 2})) == 1


def test_stop_param_and_predict_stream(served):
    """The served model takes `stop` (a list of strings) and streams: the pieces join into predict's text."""
    model, client, _ = served
    params = {"max_new_tokens": 6}
    whole = model.predict(["床前明月光"], params=params)[0]
    pieces = list(model.predict_stream(["床前明月光"], params=params))
    assert len(pieces) >= 1 and "".join(pieces) == whole
    if whole:
        stop = whole[len(whole) // 2:][:1]
        r = _post(client, {"inputs": ["床前明月光"], "params": {**params, "stop": [stop]}})
        assert r.status_code == 200, r.text
        assert stop not in r.json()["predictions"][0]


@pytest.fixture(scope="module")
def guarded(served):
    """The app as `cpmant serve` runs it: MLflow's scoring app behind registry.serving_app.guard."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from registry.serving_app import guard

    return TestClient(guard(scoring_server.init(served[0])))


@pytest.mark.parametrize("inputs", [{"inputs": [1, None, {}]}, {"instances": [{"text": 3}]},
                                    {"dataframe_split": {"columns": ["text"], "data": [[None]]}}])
def test_non_string_prompts_are_refused_with_400(served, guarded, inputs):
    """Before: `[1, null, {}]` was answered 200 (continuations of "1", "None", "{}": MLflow's parser makes strings)."""
    from mlflow.exceptions import MlflowException

    r = _post(guarded, {**inputs, "params": {"max_new_tokens": 1}})
    assert r.status_code == 400 and "must be a string" in r.json()["message"], r.text
    assert _post(guarded, {"inputs": ["床前明月光"], "params": {"max_new_tokens": 1}}).status_code == 200
    with pytest.raises(MlflowException, match="3 are not"):  # a direct caller of predict too
        served[0].predict([1, None, {}], params={"max_new_tokens": 1})


def test_long_prompts_are_cut_before_tokenising_and_huge_requests_refused(served, guarded):
    """Before: 80k characters took 58 s to tokenise, a 2 MB body timed out after 60 s (504)."""
    import time

    from mlflow.exceptions import MlflowException

    from registry.pyfunc_model import MAX_REQUEST_CHARS
    from registry.serving_app import MAX_BODY_BYTES

    model, _, _ = served
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    t0 = time.perf_counter()
    r = _post(guarded, {"inputs": ["a" * 2_000_000], "params": {"max_new_tokens": 1}})
    assert r.status_code == 413 and f"{MAX_BODY_BYTES:,} bytes" in r.json()["message"], r.text
    # 150k characters: 900 kB as JSON's \uXXXX escapes, under the cap, cut and answered at once
    r = _post(guarded, {"inputs": [poem * (150_000 // len(poem))], "params": {"max_new_tokens": 1}})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    with pytest.warns(UserWarning, match="before tokenising"):
        out = model.predict([poem * (MAX_REQUEST_CHARS // len(poem))], params={"max_new_tokens": 2})
    assert len(out) == 1 and isinstance(out[0], str)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(MlflowException, match="more than"):
        model.predict([poem * (2_000_000 // len(poem))], params={"max_new_tokens": 1})


def test_cut_by_characters_keeps_the_tokens_the_model_uses(fixture_corpus, tmp_path):
    """The character cut drops only what the token truncation would drop: the kept ids are those of the full text."""
    from cpmant.config import ModelConfig
    from cpmant.generate import encode_inputs
    from cpmant.tokenizer import CPMAntTokenizer, build_vocab

    lines = (fixture_corpus / "poems.txt").read_text(encoding="utf-8").splitlines()
    tok = CPMAntTokenizer(build_vocab(lines, 600, tmp_path / "vocab.txt"))
    cfg = ModelConfig(vocab_size=600, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=16,
                      position_bias_max_distance=64, prompt_length=4)
    text = "".join(lines)[:2000]
    budget = 64 - 4 - 8
    assert len(text) > budget * tok.max_token_chars  # long enough to be cut by characters
    with pytest.warns(UserWarning, match="before tokenising"):
        (row,) = encode_inputs(tok, [text], cfg, 8)
    full = [i for i in tok.encode(text) if i != tok.unk_id]
    assert len(row) == budget and row[0] == tok.bos_id
    assert row[-(budget // 2):] == full[-(budget // 2):]  # the kept tail (the left edge may segment differently)
