"""Every layer's proxy loss for a preset one-shot on SmolLM2 (calibration: 64 x 512 from valid's calibration
part, seed 0), as a JSON list: what vptq.config's rescue_loss threshold was checked against.

  python bench/layer_losses.py BITS OUT.json     (made bench/results/smollm2_preset2_oneshot_layer_losses_20261206.json)
"""

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vptq.config import resolve  # noqa: E402
from vptq.pipeline import compress  # noqa: E402
from vptq.splits import write_parts  # noqa: E402

bits = int(sys.argv[1])
calib, _ = write_parts(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt", tempfile.mkdtemp())
cfg, _ = resolve(bits, {"e2e_steps": 0})  # as a one-shot job resolves it (ONESHOT_DEFAULTS)
res, _, _ = compress("smollm2", cfg, None, calib, 64, 512, "cpu")
rows = [dict(name=r.name, proxy_loss=r.proxy_loss, bpw=r.bpw) for r in res.report.layers]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=0) + "\n")
losses = sorted(r["proxy_loss"] for r in rows)
print("median", losses[len(losses) // 2], "max", losses[-5:])
