"""Converts a Hugging Face model directory or a GGUF file into an ollm-jax checkpoint.

    python checkpoints/convert.py SRC DST [--dtype bfloat16|float32|float16]

A thin wrapper over `ollm_jax.convert.convert`; exits with code 2 and the message on a
bad checkpoint.
"""

import argparse
import sys

from ollm_jax.convert import convert_cli_args, convert_cli_main


def main(argv=None) -> int:
    parser = convert_cli_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return convert_cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
