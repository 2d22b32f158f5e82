"""Training loops taking turns step by step, each in its own spawned process (bench_tracking_overhead.py and
bench_mfu.py).

Whole runs timed one after another are minutes apart, and on a shared machine the load changes in between (we saw
+-50% between runs). Taking turns step by step puts the steps being compared within a second of each other, so
they meet the same load, and per-step paired ratios cancel most of it. Only one loop computes at a time.
"""

from __future__ import annotations

import os
import time

from _common import our_loss, pretrain_stream, vocab_size_of

STEADY_SKIP = 2  # per-step timings start after this many steps (first steps allocate and create AdamW state)
# glibc malloc settings for the loops: keep freed memory instead of handing it back to the kernel. By default big
# buffers (logits, attention bias) are unmapped or trimmed when freed and page-faulted in again on the next step;
# where that lands differs from process to process, and it moved A/A step times (the same loop in two processes)
# by up to 11%, far above the 1% being measured. With these, A/A agree within 1%.
LOOP_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


class Gate:
    """One loop's side of the turn-taking (see take_turns): each step ends its turn, the next waits for one.

    A step's time runs from getting the turn to handing it on, so the other loops' steps are never in it.
    """

    def __init__(self, name: str, sem, queue):
        self.name, self.sem, self.queue = name, sem, queue
        self.started = 0.0
        self.seconds: list[float] = []  # one entry per step
        self.ends: list[float] = []  # perf_counter at the end of each step

    def wait(self) -> None:
        self.sem.acquire()
        self.started = time.perf_counter()

    def step(self, name: str | None = None) -> None:
        t = time.perf_counter()
        self.seconds.append(t - self.started)
        self.ends.append(t)
        self.queue.put(("done", self.name))
        self.wait()


def _loop_process(kind: str, name: str, cfg, prepared, flush_steps: int, sem, queue) -> None:
    """A spawned process running one loop: set up, wait for the first turn, train, send back the timings."""
    import traceback

    try:
        import torch  # noqa: F401  (imported before the first turn, like everything else that is slow to load)

        if kind == "tracked":
            from registry.tracking import setup_tracking
            from tasks.metering import AsyncMetricLogger  # noqa: F401

            setup_tracking("cpmant-bench")
        gate = Gate(name, sem, queue)
        queue.put(("ready", name))
        gate.wait()
        runner = {"bare": bare_loop, "ours": loop_run, "tracked": tracked_run}[kind]
        out = runner(cfg, prepared, gate, name, flush_steps)
        out.update(seconds=gate.seconds, ends=gate.ends)
        queue.put(("result", name, out))
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it
        queue.put(("error", name, traceback.format_exc()))
    finally:
        queue.put(("left", name))


def take_turns(loops: dict[str, tuple[str, object]], prepared, flush_steps: int) -> dict[str, dict]:
    """Run training loops side by side, one step at a time in turn (A B C, B C A, C A B, ...); one loop alone
    runs its steps through the same gate, so its step times are measured the same way.

    Each loop has its own process (spawned: a fresh interpreter, as a real run; threads were tried first, but glibc
    gives each thread its own malloc arena, and that alone moved step times by several percent in A/A tests), with
    LOOP_MALLOC_ENV, and the order rotates after every cycle so no loop always follows the same one.
    loops: name -> (kind, PretrainConfig) with kind "bare", "ours" or "tracked". Returns name -> the loop's result
    with its per-step `seconds` and `ends`.
    """
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    sems = {n: ctx.Semaphore(0) for n in loops}
    procs = [ctx.Process(target=_loop_process, args=(kind, n, cfg, prepared, flush_steps, sems[n], queue),
                         name=f"bench-{n}", daemon=True) for n, (kind, cfg) in loops.items()]
    results: dict[str, dict] = {}
    saved_env = {k: os.environ.get(k) for k in LOOP_MALLOC_ENV}

    def receive(want: set[str]) -> tuple:
        while True:
            try:
                msg = queue.get(timeout=900)
            except queue_mod.Empty:
                raise RuntimeError("a benchmark loop stopped answering for 15 minutes") from None
            if msg[0] == "error":
                raise RuntimeError(f"benchmark loop {msg[1]} failed:\n{msg[2]}")
            if msg[0] == "result":
                results[msg[1]] = msg[2]
            elif msg[0] in want:
                return msg

    try:
        os.environ.update(LOOP_MALLOC_ENV)  # a spawned process takes this process's environment when it starts
        try:
            for p in procs:
                p.start()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for _ in procs:  # all imported and set up before the first turn is given
            receive({"ready"})
        order, pos = list(loops), 0
        while order:
            name = order[pos]
            sems[name].release()
            msg = receive({"done", "left"})
            if msg[1] != name:
                raise RuntimeError(f"loop {msg[1]} answered during the turn of {name}")
            if msg[0] == "left":
                order.pop(pos)
            else:
                pos += 1
            if order and pos >= len(order):  # a cycle is over: rotate the order
                pos, order = 0, order[1:] + order[:1]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return results


class StepClock:
    """Loop callbacks that end each step's turn at the gate, after passing the step on to `inner`.

    With inner=None this is the loop without tracking (as callbacks=None; the gate costs tens of microseconds per
    step and every loop, the bare one included, pays it alike). The time spent in inner's callbacks is recorded
    too, to time MLflow's share directly.
    """

    def __init__(self, gate: Gate, name: str, inner=None):
        self.gate, self.name, self.inner = gate, name, inner
        self.inner_seconds: list[float] = []

    def on_step(self, step, metrics):
        if self.inner is not None:
            t = time.perf_counter()
            self.inner.on_step(step, metrics)
            self.inner_seconds.append(time.perf_counter() - t)
        self.gate.step(self.name)

    def on_eval(self, step, metrics):
        if self.inner is not None:
            self.inner.on_eval(step, metrics)

    def on_checkpoint(self, step, path):
        if self.inner is not None:
            self.inner.on_checkpoint(step, path)


def _time_flushes(logger) -> list[dict]:
    """Record wall and CPU time of each MLflow log_batch the logger's background thread makes."""
    flushes: list[dict] = []
    send = logger.client.log_batch  # the thread looks the attribute up per call, and is idle until the first flush

    def timed(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return send(*args, **kwargs)
        finally:
            flushes.append({"start": t, "wall": time.perf_counter() - t, "cpu": time.thread_time() - c,
                            "metrics": len(kwargs.get("metrics") or [])})

    logger.client.log_batch = timed
    return flushes


def bare_loop(cfg, prepared, gate: Gate, name: str, flush_steps: int = 0) -> dict:
    """The same model, batches, loss, AdamW and clipping as the loop; nothing else (no logs, callbacks, eval, saves).

    The loss is computed as the loop computes it (our_loss: logits only where there are targets), so the
    comparison shows the loop's overhead, not a difference in the work done.
    """
    import torch

    from cpmant.model import CPMAnt
    from cpmant.training.loop import build_model_config

    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    mcfg = build_model_config(cfg, vocab_size_of(prepared))
    stream = pretrain_stream(prepared.train_docs, mcfg, cfg.seq_len, cfg)
    torch.manual_seed(cfg.seed)
    model = CPMAnt(mcfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    B, tokens, targets = cfg.micro_batch_size, 0, 0
    for step in range(cfg.max_steps):
        b = stream.batch(range(step * B, (step + 1) * B))
        loss = our_loss(model, b.model_inputs(), b.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b.length.sum())
        targets += b.num_targets
        gate.step(name)
    return {"tokens_per_step": tokens / cfg.max_steps, "target_share": targets / (cfg.max_steps * B * cfg.seq_len)}


def loop_run(cfg, prepared, gate: Gate, name: str, flush_steps: int = 0) -> dict:
    """pretrain() with callbacks=None (plus the turnstile)."""
    from cpmant.training.loop import pretrain

    return {"result": pretrain(cfg, StepClock(gate, name), prepared=prepared, progress=False)}


def tracked_run(cfg, prepared, gate: Gate, name: str, flush_steps: int) -> dict:
    """pretrain() inside an MLflow run with MlflowCallbacks(AsyncMetricLogger), as tasks/pretrain.py does."""
    import mlflow

    from cpmant.training.loop import pretrain
    from tasks.metering import AsyncMetricLogger, MlflowCallbacks

    t0 = time.perf_counter()
    with mlflow.start_run(run_name="bench-pretrain-tracking"):
        logger = AsyncMetricLogger(mlflow.active_run().info.run_id, flush_steps)
        flushes = _time_flushes(logger)
        clock = StepClock(gate, name, MlflowCallbacks(logger))
        t1 = time.perf_counter()
        try:
            res = pretrain(cfg, clock, prepared=prepared, progress=False)
        finally:
            t2 = time.perf_counter()
            logger.close()
    t3 = time.perf_counter()
    return {"result": res, "flushes": flushes, "callback_seconds": clock.inner_seconds,
            "fixed_s": (t1 - t0) + (t3 - t2)}  # start_run + logger start, logger.close + end_run


def loop_configs(names, steps: int, out_dir):
    """The tiny preset with the default PretrainConfig, `steps` steps; only the final eval and save happen, after
    the last step, outside the timed steps. One output folder per loop."""
    from cpmant.training.config import PretrainConfig

    return {n: PretrainConfig(preset="tiny", max_steps=steps, eval_interval=steps, save_interval=steps,
                              resume="never", output_dir=str(out_dir / n.replace("+", "-"))) for n in names}
