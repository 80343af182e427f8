"""mlxbastion: a private, on-device LLM toolkit built on Apple's MLX.

The public API::

    from mlxbastion import load, generate

    model, tokenizer = load("path/to/mlx_model")
    prompt = tokenizer.encode_prompt("Tell me a story")
    print(generate(model, tokenizer, prompt, max_tokens=100))
"""

__version__ = "0.1.0"

# The function imports rebind the names `convert` and `generate`, which
# importing the submodules of the same name would otherwise leave bound
# to the modules.
from .checkpoint import load, load_model
from .config import ModelArgs
from .convert import convert
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .model import Model
from .sample import make_sampler
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "GenerationResponse",
    "Model",
    "ModelArgs",
    "Tokenizer",
    "convert",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "load_tokenizer",
    "make_sampler",
    "stream_generate",
]
