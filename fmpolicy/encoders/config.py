"""`EncoderConfig` lives in `fmpolicy.config` with the other configs (a `PolicyConfig` holds one);
it is re-exported here for the encoder modules."""

from __future__ import annotations

from fmpolicy.config import ENCODER_KINDS, IMAGES_PREFIX, TEXT_MODELS, EncoderConfig

__all__ = ["ENCODER_KINDS", "IMAGES_PREFIX", "TEXT_MODELS", "EncoderConfig"]
