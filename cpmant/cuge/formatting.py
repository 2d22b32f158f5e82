"""CPM-Ant's fine-tuning rows (CPM-Live `examples/tune.py` / `infer.py`, branch cpm-ant) and generation after the
tuning prompt; with `zero_shot`, the same rows and generation after the prompt the base was pretrained with (the LM
task's, `cpmant.training.data.TASK_LM`). See `cpmant.cuge.base` for the format."""

from __future__ import annotations

import warnings

import torch

from ..errors import CpmantError
from ..training.data import TASK_LM

YES = "是"
JUDGE = "[是否正确]"
TUNE_PROMPT_TASK = 1  # CPM-Live tunes and infers CUGE tasks with task_id=1
PRETRAIN_PROMPT_TASK = TASK_LM  # zero-shot: the left-to-right LM prompt of pretraining (prompt ids 2P..3P-1)
TEXT_SEGMENT = 2  # the text's segment in tuning, and the LM task's text segment in pretraining
IGNORE = -100


def prompt_task(config, zero_shot: bool = False) -> int:
    """The prompt (task id) of CUGE rows: the tuning prompt, or with `zero_shot` the pretraining LM prompt; task 0
    when the model has too few prompt types."""
    task = PRETRAIN_PROMPT_TASK if zero_shot else TUNE_PROMPT_TASK
    return task if config.prompt_types > task else 0


class Formatter:
    """Builds padded model inputs for one model and tokenizer; `yes_id` is the id of 是. `zero_shot`: the rows
    carry the pretraining prompt instead of the tuning prompt."""

    def __init__(self, model, tokenizer, max_len: int, zero_shot: bool = False):
        c = model.config
        self.tok, self.P = tokenizer, c.prompt_length
        self.prompt_task = prompt_task(c, zero_shot)
        self.segment = TEXT_SEGMENT if c.segment_types > TEXT_SEGMENT else c.segment_types - 1
        self.room = min(max_len, c.position_bias_max_distance) - self.P  # text tokens per row
        if self.room < 4:
            raise CpmantError(f"max_len {max_len} leaves {self.room} tokens after the {self.P}-token prompt",
                              "raise the task's max_len")
        self.device = next(model.parameters()).device
        ids = [i for i in tokenizer.encode(YES) if i != tokenizer.unk_id]
        if len(ids) != 1:
            raise CpmantError(f"the vocab has no single token for {YES!r} (encodes to {ids}), so choice and "
                              "ranking tasks cannot be scored",
                              f"use a model whose vocab.txt contains {YES!r}")
        self.yes_id = ids[0]
        self.judge = self.encode(JUDGE)

    def encode(self, text: str) -> list[int]:
        return [i for i in self.tok.encode(text) if i != self.tok.unk_id]

    def _rows(self, texts: list[list[int]], n_context: list[int]) -> dict[str, torch.Tensor]:
        P, B = self.P, len(texts)
        T = P + max(len(t) for t in texts)
        inp = torch.zeros(B, T, dtype=torch.long)
        context = torch.zeros(B, T, dtype=torch.bool)
        segment = torch.zeros(B, T, dtype=torch.long)
        length = torch.zeros(B, dtype=torch.long)
        inp[:, :P] = torch.arange(P) + self.prompt_task * P
        context[:, :P] = True
        for b, (t, nc) in enumerate(zip(texts, n_context)):
            inp[b, P:P + len(t)] = torch.tensor(t, dtype=torch.long)
            context[b, P:P + nc] = True
            segment[b, P:P + len(t)] = self.segment
            length[b] = P + len(t)
        position = torch.arange(T).expand(B, T).clone()
        span = torch.zeros(B, T, dtype=torch.long)
        batch = dict(input=inp, length=length, context=context, position=position, segment=segment, span=span)
        return {k: v.to(self.device) for k, v in batch.items()}

    def generation_batch(self, examples: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, n_ctx = [], []
        for ex in examples:
            tgt = self.encode(ex.target)[: max(1, self.room // 2) - 1] + [self.tok.eos_id]
            inp = [self.tok.bos_id] + self.encode(ex.input)
            keep = self.room - len(tgt)
            if len(inp) > keep:
                inp = [self.tok.bos_id] + inp[len(inp) - keep + 1:]
            texts.append(inp + tgt)
            n_ctx.append(len(inp))
        batch = self._rows(texts, n_ctx)
        target = torch.full_like(batch["input"], IGNORE)
        nxt_nc = ~batch["context"][:, 1:] & (torch.arange(1, target.size(1), device=target.device)[None, :]
                                              < batch["length"][:, None])
        target[:, :-1] = torch.where(nxt_nc, batch["input"][:, 1:], IGNORE)
        return batch, target

    def judge_batch(self, pairs: list[tuple[str, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All-context rows `<s> + input + option + [是否正确]` and the mask of each row's last position."""
        texts = []
        for inp_text, option in pairs:
            tail = self.encode(option) + self.judge
            inp = [self.tok.bos_id] + self.encode(inp_text)
            keep = self.room - len(tail)
            if keep < 1:  # the option alone overflows: keep <s> and the end of option + judge
                texts.append([self.tok.bos_id] + tail[len(tail) - self.room + 1:])
                continue
            if len(inp) > keep:
                inp = [self.tok.bos_id] + inp[len(inp) - keep + 1:]
            texts.append(inp + tail)
        batch = self._rows(texts, [len(t) for t in texts])
        last = torch.zeros_like(batch["context"])
        last[torch.arange(len(texts), device=last.device), batch["length"] - 1] = True
        return batch, last


class TuningPrompt(torch.nn.Module):
    """A model as cpmant.generate sees it, with the tuning prompt (task 1) in place of pre-training's task-2 prompt.

    cpmant.generate lays every row out as [prompt][padding][text] with the task-2 prompt; a tuned model expects the
    task-1 prompt it was tuned with. The first `inference` call (no cache yet) holds the prompt columns: they are
    replaced there; everything else (layout, bans, cache, decoding loop) is cpmant.generate's own."""

    def __init__(self, model, task: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.prompt_task = task

    def inference(self, input, *args, past_key_values=None, **kwargs):
        if past_key_values is None:
            P = self.config.prompt_length
            input = input.clone()
            input[:, :P] = torch.arange(P, device=input.device) + self.prompt_task * P
        return self.model.inference(input, *args, past_key_values=past_key_values, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def generate_tuned(model, tokenizer, texts: list[str], settings: dict, zero_shot: bool = False) -> list[str]:
    """`cpmant.generate.generate` (GenerationConfig `settings`) after the tuning prompt (task 1), or after the
    pretraining prompt with `zero_shot` (the prompt `generate` itself lays out)."""
    from ..generate import generate

    task = prompt_task(model.config, zero_shot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long inputs are cut from the left, as in tuning
        return generate(TuningPrompt(model, task), tokenizer, list(texts), dict(settings))
