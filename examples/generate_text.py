"""Generate text with the Python API, streaming it as it comes.

    python examples/generate_text.py MODEL_FOLDER "Once upon a time"

MODEL_FOLDER is anything `mlxbastion convert` wrote (or an mlx-lm folder).
"""

import sys

from mlxbastion import load, stream_generate

model_path = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"

# load() picks float32 compute on the CPU backend, the stored dtype on a GPU.
model, tokenizer = load(model_path)

# encode_prompt applies the chat template when the model has one.
tokens = tokenizer.encode_prompt(prompt)

# Each response carries the new text plus running statistics.
for response in stream_generate(model, tokenizer, tokens, max_tokens=60):
    print(response.text, end="", flush=True)
print()
print(
    f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tok/s",
    file=sys.stderr,
)
