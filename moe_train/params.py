"""`moe-train-params [overrides]`: total and active parameters of a configured model, without allocating it.

    moe-train-params model=mixtral_8x7b
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from moe_train.cli_config import compose_config, exit_on_config_error
from moe_train.config.model import validate_model_config
from moe_train.config.moe import validate_moe_config
from moe_train.models.params import count_parameters
from moe_train.models.transformer import Transformer


def main(argv: Optional[list[str]] = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    with exit_on_config_error("moe-train-params"):
        cfg = compose_config(overrides)
        validate_model_config(cfg.model, cfg.moe)
        if cfg.model.moe_every > 0:
            validate_moe_config(cfg.moe, cfg.model.d_model)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    print(count_parameters(model).describe())


if __name__ == "__main__":
    main()
