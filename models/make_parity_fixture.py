"""Make tests/fixtures/smollm2_parity.npz: SmolLM2 reference logits computed by `transformers`.

`transformers` (with `torch` CPU and `accelerate`) loads the same GGUF that `--model smollm2`
uses, dequantized to float32, and computes the last-position logits of a few prompts; the test
(tests/test_models_smollm2.py) checks that our JAX model gives the same logits and top-5.
torch stays out of the project's requirements: run this in a separate environment.

Regenerate (from the repository root):

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch transformers accelerate gguf numpy   # CPU torch is enough
    .venv/bin/python -c "from models.smollm2 import smollm2_gguf; print(smollm2_gguf())"  # fetch the GGUF
    /tmp/venv-ref/bin/python models/make_parity_fixture.py \
        --gguf ~/.cache/hata-jax/SmolLM2-135M-Instruct.Q4_1.gguf

The fixture holds, per prompt: its text and whether the chat template was applied, the token
ids transformers produced (`ids_<i>`), the top-50 token ids and logits of the last position
(`top_ids_<i>`, `top_logits_<i>`), and for the first (chat) prompt transformers' greedy
continuation (`greedy_ids`). Committed fixture made with transformers 5.23.0, torch 2.13.0+cpu.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

PROMPTS = [
    ("What is the capital of France?", True),
    ("Write one sentence about the ocean.", True),
    ("The quick brown fox jumps over the lazy dog. The dog", False),
]
TOP = 50
GREEDY_TOKENS = 8
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "smollm2_parity.npz"


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=pathlib.Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    gguf = args.gguf.expanduser().resolve()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()

    arrays: dict[str, np.ndarray] = {
        "texts": np.array([text for text, _ in PROMPTS]),
        "chat": np.array([chat for _, chat in PROMPTS]),
        "versions": np.array([f"transformers {transformers.__version__}, torch {torch.__version__}"]),
    }
    for i, (text, chat) in enumerate(PROMPTS):
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float().numpy()
        top = np.argsort(-logits)[:TOP]
        arrays[f"ids_{i}"] = np.array(ids, np.int32)
        arrays[f"top_ids_{i}"] = top.astype(np.int32)
        arrays[f"top_logits_{i}"] = logits[top].astype(np.float32)
        print(f"prompt {i}: {len(ids)} tokens, top-5 {[tokenizer.decode([t]) for t in top[:5]]}")
    with torch.no_grad():
        out = model.generate(torch.tensor([arrays["ids_0"].tolist()]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    arrays["greedy_ids"] = out[0, len(arrays["ids_0"]):].numpy().astype(np.int32)
    print("greedy:", repr(tokenizer.decode(arrays["greedy_ids"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
