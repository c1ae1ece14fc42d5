"""`vptq plan`: estimate memory, disk, size and time of a compression job before running it.

`register(app)` attaches the command to the main Typer app. The estimation itself is
vptq.plan (torch only); this file parses options, finds VPTQ_HOME and prints.
"""

from __future__ import annotations

import sys

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import EXIT_USAGE, errors, fail
from vptq_service.cli.output import emit, stdout_to_stderr


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
        ("bits per parameter", f"{p['bits_per_param']:.4f}", f"whole model: {p['float_params']:,} parameters stay "
                                                            "floating point (embeddings, head, norms, biases, routers)"),
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


def plan_cmd(
    source: opt.Source,
    bits: opt.Bits,
    config: opt.ConfigFile = None,
    set_: opt.Set = [],  # noqa: B006 - typer reads the default, nothing mutates it
    calib: opt.Calib = None,
    nsamples: opt.Nsamples = None,
    seqlen: opt.Seqlen = opt.DEFAULT.seqlen,
    device: opt.Device = opt.DEFAULT.device,
    finetune_steps: opt.FinetuneSteps = None,
    hessians: opt.Hessians = None,
    targets: opt.Targets = None,
    layer: opt.Layers = None,
    as_json: opt.Json = False,
    debug: opt.Debug = False,
) -> None:
    """Estimate peak memory, disk, bpw, output size and time of `vptq compress` before running it.

    Times come from a short probe on this machine (block 0's forward, one or two real linears
    quantized with the job's config, one fine-tuning step), extrapolated to the whole model.
    """
    with errors(debug):
        from vptq_service.store.db import vptq_home

        from vptq.config import resolve
        from vptq.pipeline import check_device
        from vptq.plan import plan

        cfg, nsamples = resolve(bits, opt.overrides_from(config, set_, finetune_steps, targets, layer),
                               nsamples=nsamples, hessians=hessians.value if hessians else None)
        check_device(device)
        if source.startswith(("s3://", "hf://")):
            fail(f"{source}: plan reads local sources only; `vptq pull` or download it first, then plan the "
                 "folder", EXIT_USAGE)
        home = vptq_home()
        tty = sys.stderr.isatty()

        def log(msg: str) -> None:
            if tty:
                typer.echo(f"plan: {msg}", err=True)

        with stdout_to_stderr(as_json):
            p = plan(source, cfg, nsamples, seqlen, device, home, str(calib) if calib else None, log)
        p["bits_preset"] = bits
        emit(p, as_json, "" if as_json else _human(p))


def register(main_app: typer.Typer) -> None:
    """Attach `plan` to the main app."""
    main_app.command("plan")(plan_cmd)
