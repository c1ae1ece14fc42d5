"""Load a model folder, build the engine and the app, run uvicorn until Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_engine(path: str, device: str = "cpu", max_batch: int = 8, max_queue: int = 64):
    """Engine over the model at path (a quantized or original folder, a .gguf, 'smollm2'). On CPU the
    quantized linears run on the CPU kernels (kept compressed: vptq/kernels/cpu.py) when numba is
    there; on CUDA they take the numba.cuda kernels as everywhere."""
    from vptq.generate import load_for_generation
    from vptq.kernels.cpu import available
    from vptq.kernels.dispatch import use_cpu_kernels

    from .engine import Engine
    from .graph import compile_wanted, settings

    settings()  # a bad VPTQ_SERVE_GRAPH* or VPTQ_SERVE_COMPILE value is refused before the model loads
    compile_wanted()
    model, tok = load_for_generation(path, device)
    if model.device.type == "cuda":
        # the CUDA kernels and the dense baseline both run in fp16 on a GPU (fp32 halves the throughput)
        model.half()
    if model.device.type == "cpu" and available():
        use_cpu_kernels(model)
    warm_up(model)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
    engine.decide()  # a model that cannot be served is refused here, before the port opens
    if engine.graph is not None:  # CUDA: the lone-sequence step captured before the port opens (serve/graph.py)
        logging.getLogger("vptq.serve").info("capturing the batch-1 decode step in a CUDA graph (%d cache slots)",
                                             engine.graph.max_len)
        engine.prepare_graph()
    return engine


def warm_up_rows(device_type: str) -> tuple[int, ...]:
    """Token counts of the warm-up passes. The CUDA gemv kernels are compiled per row count up to
    FUSED_MAX_ROWS and more rows take the dequantize kernel, so every count is run once (a new prompt
    length cost its first request ~8 s on an H100 otherwise). The CPU kernels are generated per
    histogram row count up to rows_apart, then one batched mode up to MAX_ROWS, then the dequantize:
    one pass of each (a fresh install compiled the batched mode on the first batch of clients)."""
    if device_type != "cuda":
        from vptq.kernels.cpu import BATCH_ALIGN, MAX_ROWS, rows_apart

        return (MAX_ROWS + 1, BATCH_ALIGN, *range(rows_apart(False), 0, -1))
    from vptq.kernels.dispatch import FUSED_MAX_ROWS

    return tuple(range(FUSED_MAX_ROWS + 1, 0, -1))


def warm_up(model) -> None:
    """Passes before the port opens (warm_up_rows): the kernels are loaded (compiled on a fresh
    install) and the layers' plans built, so no request waits for them."""
    import time

    import torch

    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    rows = [n for n in warm_up_rows(model.device.type) if not context or n <= context]  # a tiny context: no longer
    log = logging.getLogger("vptq.serve")
    log.info("warming up: %d passes on %s (a fresh install compiles the kernels first)", len(rows), model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for n in rows:
            model(input_ids=torch.zeros((1, n), dtype=torch.long, device=model.device))
    log.info("warm-up done in %.1f s", time.perf_counter() - t0)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if host in LOOPBACK or api_key:
        return None
    return (f"warning: serving on {host} without authentication: anyone who can reach this port can use the "
            "model; pass --api-key KEY")


def serve(path: str, model_id: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          api_key: str | None = None, max_batch: int = 8, max_queue: int = 64, max_tokens: int = 2048) -> None:
    import uvicorn

    from .api import create_app

    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    engine = load_engine(path, device, max_batch, max_queue)
    app = create_app(engine, model_id, api_key=api_key, max_tokens_limit=max_tokens)
    engine.start()
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=True,
                                      timeout_graceful_shutdown=5)).run()
    finally:
        engine.stop()
