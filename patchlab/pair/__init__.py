"""The pair and its sites: model families (where each site lives), loading and validating a vanilla / unlearned
pair (checkpoints, hub ids, PEFT adapters, device maps), parameter names as module types, prompts and greedy answers."""

from patchlab.pair.loading import (HUB_TIMEOUT_S, ModelPair, ModelSpec, TokenizerSpec, check_compatible,
                                   check_tokenizers, hub_reachable, is_hub_id, load_model, load_pair, load_tokenizer,
                                   trace_model)
from patchlab.pair.placement import DeviceMap, execution_device, input_device, parameter_value

__all__ = ["DeviceMap", "HUB_TIMEOUT_S", "ModelPair", "ModelSpec", "TokenizerSpec", "check_compatible",
           "check_tokenizers", "execution_device", "hub_reachable", "input_device", "is_hub_id", "load_model",
           "load_pair", "load_tokenizer", "parameter_value", "trace_model"]
