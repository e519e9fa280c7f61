"""Saves a small random Llama with a character tokenizer, a stand-in base for trying `lora-ops train` offline.

    python examples/train_many/make_tiny_base.py results/tiny-base

Any local causal LM folder (transformers ``AutoModelForCausalLM`` + its tokenizer) works as ``base`` instead.
"""

import argparse

from lora_ops.recipes.data import CharTokenizer
from lora_ops.recipes.model import TinyConfig, build_tiny_llama


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (config.json, model.safetensors, char_tokenizer.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = CharTokenizer.default()
    model = build_tiny_llama(tok.vocab_size, TinyConfig(hidden=64, layers=2, heads=4, intermediate=128, max_len=96),
                             seed=args.seed)
    model.save_pretrained(args.out)
    tok.save(f"{args.out}/char_tokenizer.json")
    print(f"saved a random tiny Llama to {args.out}")


if __name__ == "__main__":
    main()
