"""The pair and its sites: model families (where each site lives), loading and validating a vanilla / unlearned
pair, parameter names as module types, prompts and greedy answers."""

from patchlab.pair.loading import (ModelPair, ModelSpec, TokenizerSpec, check_compatible, check_tokenizers,
                                   load_model, load_pair, load_tokenizer, trace_model)

__all__ = ["ModelPair", "ModelSpec", "TokenizerSpec", "check_compatible", "check_tokenizers", "load_model",
           "load_pair", "load_tokenizer", "trace_model"]
