#!/usr/bin/env python3
"""Convert MambaOut weights between files and key layouts.

Reads any supported weights file (.pth, .pth.tar, .pt, .bin, .safetensors; plain or wrapped by a trainer, in the
original release layout or timm's) and writes its weights in the chosen layout, as .safetensors or a torch file
by the extension of OUT.

    python scripts/convert_checkpoint.py mambaout_femto.pth mambaout_femto.safetensors
    python scripts/convert_checkpoint.py train/last.pth.tar ema.pth --ema --layout original

Files holding pickled Python objects are refused unless --trust-pickle says they come from a source you trust.
Exit code 2 on unusable input.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.checkpoint import (  # noqa: E402
    CheckpointError, detect_layout, guess_variant, read_weights_file, save_weights, unwrap_state_dict)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('input', type=Path, help='weights file to read')
    parser.add_argument('output', type=Path, help='file to write: .safetensors, .pth, .pth.tar, .pt or .bin')
    parser.add_argument('--layout', choices=('timm', 'original'), default='timm',
                        help='key layout to write (default: timm, which our models and the timm hub use)')
    parser.add_argument('--ema', action='store_true', help='take the EMA weights of a training checkpoint')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='unpickle arbitrary objects in the input; this runs code from the file, so only '
                             'for files from a source you trust')
    return parser.parse_args()


def read_trusted(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Full unpickling, for a file the user vouches for."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as err:  # whatever went wrong, report it as one line
        detail = ' '.join(str(err).split())
        raise CheckpointError(f'{path}: cannot be read ({type(err).__name__}: {detail})') from None
    return unwrap_state_dict(checkpoint, use_ema=use_ema, source=str(path))


def main() -> int:
    args = parse_args()
    try:
        if args.trust_pickle:
            state_dict = read_trusted(args.input, args.ema)
        else:
            state_dict = read_weights_file(args.input, use_ema=args.ema)
        variant = guess_variant(state_dict) or 'no known MambaOut variant'
        print(f'read {args.input}: {len(state_dict)} tensors, {detect_layout(state_dict) or "non-MambaOut"} '
              f'layout, {variant}{" (EMA)" if args.ema else ""}')
        save_weights(state_dict, args.output, layout=args.layout)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {args.output}: {len(state_dict)} tensors, {args.layout} layout')
    return 0


if __name__ == '__main__':
    sys.exit(main())
