"""`vptq plan`: estimate memory, disk, size and time of a compression job before running it.

`register(app)` attaches the command to the main Typer app. The estimation itself is
vptq.plan (torch only); this file parses options, finds VPTQ_HOME and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h ({s:,.0f} s)"
    if s >= 60:
        return f"{s / 60:.1f} min ({s:,.0f} s)"
    return f"{s:.1f} s"


def _human(p: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    tm, mem, disk = p["time"], p["memory"], p["disk"]
    t = Table(title=f"vptq plan: {p['source']} ({p['device']}, {p['nsamples']} x {p['seqlen']} calibration)",
              show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("estimate", justify="right")
    t.add_column("notes")
    rows = [
        ("blocks / linears", f"{p['blocks']} / {p['linears']}", f"{p['weights']:,} weights quantized"),
        ("bpw all-in", f"{p['bpw']:.4f}", "exact: layer_bits of every target linear"),
        ("output size", _size(p["output_bytes"]), f"quantized linears {_size(p['quantized_bytes'])}, "
                                                  "rest fp32 as loaded; + tokenizer/config files"),
        ("peak device memory", _size(p["peak_device_bytes"]),
         f"block phase {_size(mem['block_phase_device_bytes'])}"
         + (f", e2e fine-tune {_size(mem['e2e_phase_device_bytes'])}" if mem["e2e_phase_device_bytes"] else "")),
        ("peak host memory", _size(p["peak_host_bytes"]),
         f"fp32 model {_size(mem['model_fp32_bytes'])}, activations {_size(mem['activation_bytes'])} a copy"
         + (f", teacher cache {_size(mem['teacher_cache_bytes'])}" if mem["teacher_cache_bytes"] else "")),
        ("Hessians (per block, memory)", _size(p["hessian_bytes"]), "fp64 accumulators + fp32 copies; never on disk"),
        ("workspace disk", _size(p["workspace_bytes"]), f"+ store copy {_size(disk['store_bytes'])} = "
                                                        f"{_size(p['disk_bytes'])}"),
        ("time per block", _dur(p["seconds_per_block"]),
         f"quantize linears {_dur(tm['seconds_quantize_linears'] / p['blocks'])}, "
         f"Hessian forward {_dur(tm['seconds_hessians'] / p['blocks'])}"),
        ("quantize all linears", _dur(tm["seconds_quantize_linears"]), ""),
    ]
    if tm["e2e"]:
        rows.append(("e2e fine-tuning", _dur(tm["seconds_e2e"]),
                     f"{tm['e2e']['steps']} steps x {tm['e2e']['step_seconds']:.2f} s"
                     + (", teacher log-probs cached" if tm["e2e"]["teacher_cached"] else "")))
    rows.append(("time total", _dur(p["seconds_total"]), "evaluation before/after not included"))
    for r in rows:
        t.add_row(*r)
    verdict = "[green]fits[/green]" if p["fits"] else "[red]does NOT fit[/red]"
    t.add_row("verdict", verdict, "; ".join(p["reasons"]))
    con = Console(file=sys.stdout, width=max(120, Console().width), force_terminal=False, no_color=not sys.stdout.isatty())
    with con.capture() as cap:
        con.print(t)
        probe = p["probe"]
        lins = ", ".join(f"{x['name']} {x['shape'][0]}x{x['shape'][1]} {x['seconds']:.2f} s" for x in probe["linears"])
        con.print(f"probe ({probe['seconds']:.1f} s, model loaded: {probe['model_loaded']}): {lins}")
        for note in p.get("notes", []):
            con.print(f"note: {note}")
    return cap.get().rstrip("\n")


def register(main_app: typer.Typer) -> None:
    """Attach `plan` to the main app."""

    @main_app.command("plan")
    def plan_cmd(
        source: str = typer.Argument(..., help="HF model folder, a .gguf file or 'smollm2' (local sources)."),
        bits: int = typer.Option(..., "--bits", help="Target bits per weight preset: 2, 3 or 4."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of QuantConfig fields; "
                                              "--set wins over it."),
        set_: list[str] = typer.Option([], "--set", help="Override a QuantConfig field, e.g. --set num_centroids=256."),
        calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (default: wikitext-2 valid)."),
        nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration windows of the job (default: "
                                               "256 with fine-tuning, 64 without)."),
        seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
        device: str = typer.Option("cpu", "--device", help="Compute device: cpu or cuda."),
        finetune_steps: Optional[int] = typer.Option(
            None, "--finetune-steps", help="End-to-end KL fine-tuning steps (0 = off; default: the preset's)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Estimate peak memory, disk, bpw, output size and time of `vptq compress` before running it.

        Times come from a short probe on this machine (block 0's forward, one or two real linears
        quantized with the job's config, one fine-tuning step), extrapolated to the whole model.
        """
        from vptq_service.cli.main import EXIT_USAGE, _emit, _err, _errors, _stdout_to_stderr, overrides_from

        if bits not in (2, 3, 4):
            _err(f"--bits {bits}: choose 2, 3 or 4", EXIT_USAGE)
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            _err(f"--device {device}: use cpu or cuda", EXIT_USAGE)
        if source.startswith(("s3://", "hf://")):
            _err(f"{source}: plan reads local sources only; `vptq pull` or download it first, then plan the "
                 "folder", EXIT_USAGE)
        with _errors(debug):
            from vptq_service.store.db import vptq_home

            from vptq.config import calib_windows, preset
            from vptq.plan import plan

            over = overrides_from(config, set_)
            if finetune_steps is not None:
                if finetune_steps < 0:
                    _err(f"--finetune-steps {finetune_steps}: use 0 (off) or a positive number of steps", EXIT_USAGE)
                over["e2e_steps"] = finetune_steps
            cfg = preset(bits).with_(**over)
            nsamples = nsamples or calib_windows(cfg.e2e_steps)
            home = vptq_home()
            tty = sys.stderr.isatty()

            def log(msg: str) -> None:
                if tty:
                    typer.echo(f"plan: {msg}", err=True)

            with _stdout_to_stderr(as_json):
                p = plan(source, cfg, nsamples, seqlen, device, home, str(calib) if calib else None, log)
            p["bits_preset"] = bits
            _emit(p, as_json, "" if as_json else _human(p))
