"""Does vptq.as_linear's rewrite keep each model's function? For every model type named, a tiny random model
from its own config class (as bench/arch_sweep.py builds it), logits before and after every decoder block's
linears in other forms (fused 3-D MoE experts, Conv1D) are rewritten as nn.Linear; prints the type, how many
modules were rewritten, max |logits after - before| and max |logits|.

    python bench/rewrite_check.py gpt2 llama4_text gpt_oss ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_sweep import tiny_config  # noqa: E402

from vptq.as_linear import as_linears  # noqa: E402
from vptq.source import load_tokenizer, resolve  # noqa: E402
from vptq.targets import decoder_layers  # noqa: E402


def main() -> None:
    tok = load_tokenizer(resolve("smollm2"))
    for t in sys.argv[1:]:
        try:
            torch.manual_seed(0)
            m = transformers.AutoModelForCausalLM.from_config(tiny_config(t, tok)).eval()
            ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                a = m(ids).logits
                n = sum(len(as_linears(b)) for b in decoder_layers(m))
                b = m(ids).logits
            print(f"{t}\trewritten {n}\tmax|diff| {float((a - b).abs().max()):.3g}\tmax|logit| {float(a.abs().max()):.3g}")
        except Exception as e:  # noqa: BLE001 - the tiny model itself could not be built or run
            print(f"{t}\tnot built: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
