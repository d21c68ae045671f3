"""Files shipped inside the package.

`SHAPES_WAN`: the tiny Wan 2.1 text-to-video model of the moving-shapes world, pretrained by
`configs/shapes_pretrain.py` (diffusers folder layout: transformer/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json). 9 frames of 32 x 32 pixels.
"""

from pathlib import Path

SHAPES_WAN = Path(__file__).resolve().parent / "shapes_wan"
