"""A multi-turn conversation that reuses one KV cache across turns.

    python examples/multi_turn_chat.py MODEL_FOLDER

Each turn feeds only the tokens that are new since the previous prompt (the
last answer as the chat template renders it, then the new question): the
cache already holds everything before, so it is never run through again.
"""

import sys

from mlxbastion import generate, load

model, tokenizer = load(sys.argv[1])
questions = ["What is the capital of France?", "And of Italy?"]

cache = model.make_cache()
messages = []
seen = []  # the token ids the cache holds

for question in questions:
    messages.append({"role": "user", "content": question})
    if tokenizer.has_chat_template:
        text = tokenizer.hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode("\n".join(m["content"] for m in messages))

    # Feed only what the cache has not seen yet.
    new = ids[len(seen) :]
    answer = generate(model, tokenizer, new, max_tokens=40, cache=cache)
    print(f"> {question}\n{answer}\n")

    messages.append({"role": "assistant", "content": answer})
    # The cache now also holds the answer's tokens, except the last sampled
    # one; trim back to the prompt so the next turn re-renders the answer
    # exactly as the template writes it.
    for layer_cache in cache:
        layer_cache.trim(layer_cache.offset - len(ids))
    seen = ids
