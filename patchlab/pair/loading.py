"""Loading a vanilla checkpoint and its unlearned copy as one traced, validated pair."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from accelerate import init_empty_weights
from nnsight import TransformersModel
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from patchlab.errors import PairMismatchError, PatchlabFileError, PatchlabValueError
from patchlab.pair.adapters import (AdapterBaseWarning, adapter_base_name, is_adapter, local_adapter, merge_adapter,
                                    same_checkpoint)
from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.pair.hub import HUB_TIMEOUT_S, hub_reachable, is_hub_id
from patchlab.pair.placement import (DeviceMap, check_device, check_offload_folder, dispatch, input_device,
                                     is_dispatched, resolve_device_map)
from patchlab.pair.sequential import SequentialPair, meta_skeleton
from patchlab.pair.weights import CheckpointTensors, ModelWeights, check_safetensors
from patchlab.provenance import adapter_digest, describe_source, directory_digest, model_digest

ModelSpec = Union[str, os.PathLike, PreTrainedModel]
TokenizerSpec = Union[str, os.PathLike, PreTrainedTokenizerBase, None]


def _hub_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo_id`` with a model, adapter or tokenizer config."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("config.json", "adapter_config.json", "tokenizer_config.json"))


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode of ``huggingface_hub`` (and so of ``transformers``) for the duration of the block: files come
    from the local hub cache only, with no request and no retry."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _source(spec: str | os.PathLike, what: str) -> tuple[str, bool]:
    """``(what from_pretrained gets, whether to load it offline)`` for a path or hub id, or a clear error at once.

    An existing directory is used as is; a string of hub-id shape (:func:`is_hub_id`) goes to the hub when it
    answers within :data:`HUB_TIMEOUT_S`, and to the local hub cache (offline) when it does not or in offline
    mode; anything else is a local path that does not exist.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PatchlabFileError(f"{what} path {str(spec)!r} is a file; expected a Hugging Face checkpoint directory")
        return str(path), False
    if not is_hub_id(spec):
        raise PatchlabFileError(f"{what} directory {str(spec)!r} does not exist")
    if hub_reachable():
        return str(spec), False
    if _hub_cached(str(spec)):
        return str(spec), True
    from huggingface_hub import constants

    why = ("offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
           else f"the hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT_S:g} s")
    raise PatchlabFileError(f"{what} {str(spec)!r} is neither a local directory nor in the local hub cache, and {why}: "
                            "pass an existing checkpoint directory (a mistyped path?), or download the hub id first")


def _from_pretrained(loader: Any, spec: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec)`` with a patchlab error for a missing directory, an unreachable hub id, a
    config transformers cannot read (an unknown ``model_type``) or a truncated / corrupt safetensors file (named)."""
    source, offline = _source(spec, what)
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return loader.from_pretrained(source, **kwargs)
    except SafetensorError as err:
        if Path(source).is_dir():
            check_safetensors(Path(source), f"{what} from {str(spec)!r}")
        raise PatchlabFileError(f"could not load {what} from {str(spec)!r}: a safetensors file is unreadable ({err})"
                                ) from err
    except (OSError, ValueError) as err:
        raise PatchlabFileError(
            f"could not load {what} from {str(spec)!r} (a local checkpoint directory, or a hub id when online): {err}"
        ) from err


def _check_placement(device: Any, device_map: Any, max_memory: Any, offload_folder: Any) -> None:
    """Raise :class:`PatchlabValueError` on contradictory placement arguments, or a ``device`` this machine does
    not have (:func:`patchlab.pair.placement.check_device`)."""
    if device is not None:
        check_device(device)
    if device is not None and device_map is not None:
        raise PatchlabValueError("pass either device= (one device) or device_map= (spread over devices), not both")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        given = "max_memory" if max_memory is not None else "offload_folder"
        raise PatchlabValueError(f"{given}= only applies with device_map= (e.g. device_map='auto')")


def cast_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Cast an in-memory model to ``dtype`` in place the way ``from_pretrained(dtype=dtype)`` builds it: every
    parameter and buffer gets the dtype it has in the same class built from the same config under ``dtype``
    (on the meta device, no memory), so tensors that transformers keeps in float32 (RoPE's ``inv_freq`` and
    ``original_inv_freq``, ``_keep_in_fp32_modules``) stay float32 while the weights and the buffers created in
    the default dtype (Gemma's ``embed_scale``) become ``dtype``. ``model.to(dtype)`` would cast them all and
    change the logits. Integer and boolean tensors are never cast. Returns ``model``."""
    with init_empty_weights():
        skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    built = {name: t.dtype for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers())}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                target = built.get(prefix + name, dtype)
                if tensor.dtype != target:
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.to(target)
                    else:
                        store[name] = tensor.to(target)
    model.config.dtype = dtype
    return model


def weight_dtypes(model: PreTrainedModel) -> list[str]:
    """The dtypes of ``model``'s floating-point parameters (``["bfloat16"]``, sorted names without ``torch.``)."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})


def check_dtypes(dtypes_v: list[str], dtypes_u: list[str]) -> None:
    """Raise :class:`PairMismatchError` naming both when the two models' weight dtypes differ (a float32 vanilla
    and a bfloat16 unlearned checkpoint): their logits would differ by the rounding alone."""
    if dtypes_v != dtypes_u:
        raise PairMismatchError(f"vanilla weights are {'/'.join(dtypes_v)} but unlearned weights are "
                                f"{'/'.join(dtypes_u)}: pass dtype=... (--dtype) to load both in one dtype")


def adapter_base_for(adapter_dir: Path, adapter_base: ModelSpec | None, vanilla: ModelSpec | None = None
                     ) -> ModelSpec:
    """The base model an adapter is merged onto: ``adapter_base`` when given (with an :class:`AdapterBaseWarning`
    when it is not the checkpoint the adapter config's ``base_model_name_or_path`` names), else ``vanilla`` when
    that name is the vanilla checkpoint (:func:`~patchlab.pair.adapters.same_checkpoint`), else the named
    checkpoint itself.

    Raises:
        PatchlabValueError: the adapter names no base and none is given, or the base is itself an adapter.
        PatchlabFileError: the named base does not exist / cannot be reached; the message says it comes from the
            adapter config and names ``adapter_base=`` (``--adapter-base``).
    """
    name = adapter_base_name(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if adapter_base is not None:
        if name is not None and not same_checkpoint(name, adapter_base):
            warnings.warn(f"the adapter {str(adapter_dir)!r} was trained on {name!r} (base_model_name_or_path in "
                          f"{config}) but is merged onto adapter_base={describe_source(adapter_base)!r}",
                          AdapterBaseWarning, stacklevel=3)
        base = adapter_base
    elif name is None:
        raise PatchlabValueError(f"the adapter {str(adapter_dir)!r} names no base model (base_model_name_or_path): "
                                 "pass adapter_base=... (--adapter-base; the checkpoint it was trained on)")
    elif vanilla is not None and same_checkpoint(name, vanilla):
        base = vanilla
    else:
        try:
            _source(name, "adapter base model")
        except PatchlabFileError as err:
            raise PatchlabFileError(
                f"the adapter {str(adapter_dir)!r} names its base model {name!r} (base_model_name_or_path in "
                f"{config}), which cannot be loaded: {err}. Pass adapter_base=... (--adapter-base) naming the "
                "checkpoint it was trained on") from err
        base = name
    if is_adapter(base):
        raise PatchlabValueError(f"the base of adapter {str(adapter_dir)!r} is itself an adapter ({str(base)!r})")
    return base


def adapter_record(adapter_dir: Path, base: ModelSpec) -> dict[str, str]:
    """``{"adapter": source, "base": source, "weights": digest}`` of an adapter merged onto ``base``: the digest
    covers the adapter files and the base's weights (:func:`patchlab.provenance.adapter_digest`), so one adapter on
    two bases gives two digests. A hub-id base is hashed from its local hub snapshot."""
    if isinstance(base, PreTrainedModel):
        base_weights = model_digest(base)
    else:
        source, _ = _source(base, "adapter base model")
        folder = Path(source) if Path(source).is_dir() else hub_snapshot(str(base))
        base_weights = directory_digest(folder)
    return {"adapter": describe_source(adapter_dir), "base": describe_source(base),
            "weights": adapter_digest(directory_digest(adapter_dir), base_weights)}


def hub_snapshot(repo_id: str) -> Path:
    """The local hub-cache snapshot directory of ``repo_id`` (the one holding its ``config.json``).

    Raises:
        PatchlabFileError: the hub id is not in the local hub cache.
    """
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        raise PatchlabFileError(f"{repo_id!r} is not in the local hub cache: load it once first")
    return Path(config).parent


def _adapter_model(adapter_dir: Path, base: ModelSpec | None, dtype: torch.dtype | None) -> PreTrainedModel:
    """The base model of a PEFT adapter directory (:func:`adapter_base_for`) with the adapter merged
    (:func:`patchlab.pair.adapters.merge_adapter`), loaded whole on the CPU in ``dtype`` (an in-memory base is
    copied, then cast with :func:`cast_model`)."""
    base = adapter_base_for(adapter_dir, base)
    if isinstance(base, PreTrainedModel):
        model = copy.deepcopy(base)
        if dtype is not None:
            cast_model(model, dtype)
    else:
        model = load_model(base, dtype=dtype)
    return merge_adapter(model, adapter_dir)


def load_model(spec: ModelSpec, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               device_map: DeviceMap | None = None, max_memory: Mapping[Any, Any] | None = None,
               offload_folder: str | os.PathLike | None = None, adapter_base: ModelSpec | None = None
               ) -> PreTrainedModel:
    """A Hugging Face causal LM in eval mode, from a local directory, a hub id, a PEFT adapter directory, or an
    in-memory model.

    * A directory (or hub repository) holding ``adapter_config.json`` is a PEFT adapter (LoRA...): its base model
      (``adapter_base``, default the adapter config's ``base_model_name_or_path``; a warning when the two differ)
      is loaded and the adapter merged into it with ``peft``'s ``merge_and_unload``
      (:func:`patchlab.pair.adapters.merge_adapter`), so the result has the base model's ordinary modules and
      weights ``W + ΔW``: patching a merged adapter is patching a full checkpoint. Needs
      ``pip install 'patchlab[peft]'``.
    * ``dtype``: a path or hub id is loaded with ``from_pretrained(dtype=dtype)``, so the numbers are the ones the
      model's users get (RoPE's ``inv_freq`` stays float32); an in-memory model is cast in place the same way
      (:func:`cast_model`), never with ``model.to(dtype)``.
    * ``device_map`` (``"auto"`` or ``{module name: device}``) places the model with Accelerate's big-model
      dispatch (``from_pretrained(device_map=...)``; ``dispatch_model`` for in-memory models, placed in place,
      and merged adapters, which pass through the CPU whole), within ``max_memory`` (``{0: "20GiB", "cpu":
      "60GiB"}``), modules mapped to ``"disk"`` keeping their weights in ``offload_folder``.
    * Otherwise an in-memory model is returned as is, converted in place when ``dtype``/``device`` are given.

    The returned model is in eval mode.

    Raises:
        PatchlabFileError: the directory does not exist or holds no loadable checkpoint (a truncated or corrupt
            safetensors file is named), the hub id cannot be reached (after at most :data:`HUB_TIMEOUT_S`
            seconds), or an adapter's named base cannot be loaded (pass ``adapter_base``).
        PatchlabValueError: ``spec`` is of another type, a ``device`` this machine lacks, ``dtype``/``device`` for a model already dispatched,
            ``device`` together with ``device_map``, ``max_memory`` or ``offload_folder`` without ``device_map``, a
            map that offloads to disk without ``offload_folder``, an adapter that names no base model (pass
            ``adapter_base``) or does not fit it.
        MissingDependencyError: an adapter directory without ``peft`` installed.
    """
    _check_placement(device, device_map, max_memory, offload_folder)
    adapter_dir = local_adapter(spec)
    if isinstance(spec, PreTrainedModel):
        if is_dispatched(spec) and (dtype is not None or (device is not None and device_map is None)):
            raise PatchlabValueError("the model is placed with a device map: it cannot be moved or cast with "
                                     "dtype=/device=")
        model = cast_model(spec, dtype) if dtype is not None else spec
    elif adapter_dir is not None:
        model = _adapter_model(adapter_dir, adapter_base, dtype)
    elif isinstance(spec, (str, os.PathLike)):
        placement = {}
        if device_map is not None:
            if isinstance(device_map, Mapping):
                check_offload_folder(device_map, offload_folder)
            placement = {"device_map": device_map if isinstance(device_map, str) else dict(device_map),
                         "max_memory": None if max_memory is None else dict(max_memory),
                         "offload_folder": None if offload_folder is None else str(offload_folder)}
        model = _from_pretrained(AutoModelForCausalLM, spec, "model", **({"dtype": dtype} if dtype else {}),
                                 **placement)
    else:
        raise PatchlabValueError(f"a model must be a path, a hub id or a PreTrainedModel, got {type(spec).__name__}")
    if device_map is not None and not is_dispatched(model):
        model = dispatch(model, resolve_device_map(model, device_map, max_memory=max_memory, dtype=dtype),
                         offload_folder=offload_folder)
    elif device is not None:
        model = model.to(device=device)
    return model.eval()


def load_tokenizer(spec: TokenizerSpec | ModelSpec) -> PreTrainedTokenizerBase:
    """A tokenizer from a path or hub id (returned as is when already a tokenizer)."""
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if isinstance(spec, PreTrainedModel):
        raise PatchlabValueError("an in-memory model carries no tokenizer: pass tokenizer=... explicitly")
    if not isinstance(spec, (str, os.PathLike)):
        raise PatchlabValueError(f"a tokenizer must be a path, a hub id or a tokenizer, got {type(spec).__name__}")
    return _from_pretrained(AutoTokenizer, spec, "tokenizer")


def _config_signature(cfg: PretrainedConfig) -> dict[str, Any]:
    """``{what: value}`` of the config fields two models of a pair must share (sizes in units: layers, hidden
    and intermediate widths, vocabulary rows)."""
    return {
        "architecture": cfg.model_type,
        "layer count": cfg.num_hidden_layers,
        "hidden size": cfg.hidden_size,
        "intermediate size": getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None),
        "vocab size": cfg.vocab_size,
    }


def check_configs(cfg_v: PretrainedConfig, cfg_u: PretrainedConfig) -> None:
    """Raise :class:`PairMismatchError` unless the vanilla and unlearned configs share architecture, layer count,
    hidden, intermediate and vocabulary sizes."""
    sig_v, sig_u = _config_signature(cfg_v), _config_signature(cfg_u)
    for key in sig_v:
        if sig_v[key] != sig_u[key]:
            raise PairMismatchError(f"vanilla and unlearned models differ in {key}: {sig_v[key]!r} vs {sig_u[key]!r}")


def check_vocab_size(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Raise :class:`PairMismatchError` when ``tokenizer`` has more tokens than the models' embedding rows
    (``config.vocab_size``)."""
    if len(tokenizer) > config.vocab_size:
        raise PairMismatchError(
            f"tokenizer has {len(tokenizer)} tokens but the models' vocabulary has {config.vocab_size} rows")


def check_compatible(vanilla: PreTrainedModel, unlearned: PreTrainedModel) -> None:
    """Raise :class:`PairMismatchError` unless both models share architecture, sizes, parameter shapes, weight dtype
    (:func:`check_dtypes`) and input device."""
    check_configs(vanilla.config, unlearned.config)
    check_dtypes(weight_dtypes(vanilla), weight_dtypes(unlearned))
    shapes_v = {n: tuple(p.shape) for n, p in vanilla.named_parameters()}
    shapes_u = {n: tuple(p.shape) for n, p in unlearned.named_parameters()}
    if shapes_v.keys() != shapes_u.keys():
        diff = sorted(shapes_v.keys() ^ shapes_u.keys())[:5]
        raise PairMismatchError(f"vanilla and unlearned models have different parameters, e.g. {diff}")
    for name, shape in shapes_v.items():
        if shapes_u[name] != shape:
            raise PairMismatchError(f"parameter {name} has shape {shape} in vanilla but {shapes_u[name]} in unlearned")
    dev_v, dev_u = input_device(vanilla), input_device(unlearned)
    if dev_v != dev_u:
        raise PairMismatchError(f"vanilla takes its input on {dev_v} but unlearned on {dev_u}; pass device=... or "
                                "device_map=... to load_pair")


def check_tokenizers(tok_v: PreTrainedTokenizerBase, tok_u: PreTrainedTokenizerBase) -> None:
    """Raise :class:`PairMismatchError` unless both tokenizers map every token to the same id."""
    if tok_v.get_vocab() != tok_u.get_vocab():
        raise PairMismatchError("the vanilla and unlearned checkpoints ship different tokenizers (vocabularies differ)")


def _pair_tokenizer(vanilla: ModelSpec, unlearned: ModelSpec, tokenizer: TokenizerSpec) -> PreTrainedTokenizerBase:
    """The pair's shared tokenizer: ``tokenizer`` when given, else the vanilla checkpoint's, checked against the
    unlearned checkpoint's when that is a directory shipping one (:func:`check_tokenizers`)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    tok = load_tokenizer(vanilla)
    if isinstance(unlearned, (str, os.PathLike)) and (Path(unlearned) / "tokenizer_config.json").exists():
        check_tokenizers(tok, load_tokenizer(unlearned))
    return tok


@dataclass(frozen=True)
class ModelPair:
    """A vanilla model and its unlearned copy, traced with nnsight and sharing one tokenizer.

    Attributes:
        vanilla: nnsight model wrapping ``vanilla_hf`` (``pair.vanilla.model.layers[3].mlp.down_proj.input``...).
        unlearned: nnsight model wrapping ``unlearned_hf``.
        vanilla_hf: the underlying Hugging Face model (eval mode).
        unlearned_hf: the underlying Hugging Face model (eval mode).
        tokenizer: the shared tokenizer.
        arch: module paths and the site table of this family.
        sources: how the two checkpoints were given (a resolved path, a hub id, or ``"in-memory ..."``), for
            provenance (:func:`patchlab.provenance.pair_provenance`).
        adapter: for an unlearned side given as a PEFT adapter, the adapter, its base and their joint weights
            digest (:func:`adapter_record`); ``None`` otherwise.
    """

    vanilla: TransformersModel
    unlearned: TransformersModel
    vanilla_hf: PreTrainedModel
    unlearned_hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    sources: tuple[str, str] = ("", "")
    adapter: dict[str, str] | None = None

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L."""
        return len(self.arch.layer_modules(self.vanilla_hf))

    @property
    def skeleton(self) -> PreTrainedModel:
        """A model with the pair's module structure and config (here the vanilla model itself)."""
        return self.vanilla_hf

    def model(self, which: str) -> PreTrainedModel:
        """The Hugging Face model ``which`` (``"vanilla"`` or ``"unlearned"``)."""
        if which not in ("vanilla", "unlearned"):
            raise PatchlabValueError(f"which must be 'vanilla' or 'unlearned', got {which!r}")
        return self.vanilla_hf if which == "vanilla" else self.unlearned_hf

    @contextlib.contextmanager
    def using(self, which: str) -> Iterator[PreTrainedModel]:
        """The model ``which``, for a block of work that needs only that one (both stay in memory here; a
        one-model-at-a-time pair, :class:`patchlab.pair.sequential.SequentialPair`, loads it and releases it)."""
        yield self.model(which)

    def source_weights(self) -> ModelWeights:
        """Where restorations that recompute with the vanilla weights read them: the in-memory vanilla model."""
        return ModelWeights(self.vanilla_hf, self.arch)

    @property
    def device(self) -> torch.device:
        """The input device: where the vanilla model's input embedding runs (token ids go there). Under a device
        map the layers may run elsewhere: see :func:`patchlab.pair.placement.execution_device`."""
        return input_device(self.vanilla_hf)


def trace_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> TransformersModel:
    """Wrap a Hugging Face causal LM for nnsight tracing, with the tokenizer given explicitly."""
    return TransformersModel(model, task="text-generation", tokenizer=tokenizer)


def _pair_placement(vanilla: ModelSpec, device_map: DeviceMap | None, max_memory: Mapping[Any, Any] | None,
                    offload_folder: str | os.PathLike | None, dtype: torch.dtype | None, share: int = 2
                    ) -> tuple[dict[str, Any] | None, list[Path | None]]:
    """The device map both models of a pair share (checked on the vanilla architecture, built on the meta device
    from its config; ``"auto"`` resolved there with each device's budget divided by ``share``, the models in memory
    at once) and each model's own offload folder (``offload_folder/vanilla``, ``/unlearned``)."""
    if device_map is None:
        return None, [None, None]
    if isinstance(vanilla, PreTrainedModel):
        skeleton = vanilla
    else:
        skeleton = meta_skeleton(_from_pretrained(AutoConfig, vanilla, "model config"), dtype=dtype)
        skeleton.tie_weights()
    device_map = resolve_device_map(skeleton, device_map, max_memory=max_memory, dtype=dtype, share=share)
    check_offload_folder(device_map, offload_folder)
    root = None if offload_folder is None else Path(offload_folder).expanduser()
    return dict(device_map), [None if root is None else root / side for side in ("vanilla", "unlearned")]


def load_pair(vanilla: ModelSpec, unlearned: ModelSpec, *, tokenizer: TokenizerSpec = None,
              dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              device_map: DeviceMap | None = None, max_memory: Mapping[Any, Any] | None = None,
              offload_folder: str | os.PathLike | None = None, adapter_base: ModelSpec | None = None,
              sequential: bool = False) -> ModelPair | SequentialPair:
    """Load and validate a vanilla / unlearned pair.

    Args:
        vanilla: local checkpoint directory, hub id, or in-memory ``PreTrainedModel``.
        unlearned: same, or a PEFT adapter (a directory or hub repository holding ``adapter_config.json``, e.g. a
            LoRA run). An adapter is applied to its base model and **merged** (``peft``'s ``merge_and_unload``): the
            unlearned model is then an ordinary model with weights ``W + ΔW``, so every site (coefficients, value
            vectors, attention outputs) is patched exactly as in a full checkpoint. Its base is ``adapter_base``
            when given, else the vanilla model when the adapter config's ``base_model_name_or_path`` names the
            vanilla checkpoint (same string, same directory, or the path an in-memory vanilla was loaded from), else
            that checkpoint itself (loaded from its path or the hub; when it cannot be, the error says so and names
            ``adapter_base=``). Needs ``pip install 'patchlab[peft]'``.
        tokenizer: shared tokenizer (object, directory or hub id). Defaults to the vanilla checkpoint's; when
            both checkpoints ship a tokenizer they must agree.
        dtype: load both models in this dtype (e.g. ``torch.bfloat16``) with ``from_pretrained(dtype=...)``, so
            buffers that transformers keeps in float32 (RoPE's ``inv_freq``) stay float32; in-memory models are cast
            the same way (:func:`cast_model`). Default: as stored, and then both models' weights must share one
            dtype (a float32 vanilla and a bfloat16 unlearned checkpoint are refused, naming both).
        device: move both models to this one device (e.g. ``"cuda"``).
        device_map: spread both models over several devices with Accelerate's big-model dispatch: ``"auto"``
            (the vanilla architecture placed within ``max_memory``, each device's budget split equally between
            the two models) or a dict ``{module name: device}`` (devices: GPU indices, ``"cpu"``, ``"disk"``). Both
            models get the same map, so layer ``i`` of both runs on the same device; ``pair.device`` is then the
            input embedding's device.
        max_memory: with ``device_map="auto"``, the memory the *pair* may use per device (``{0: "40GiB",
            "cpu": "100GiB"}``; default: what is free); what does not fit goes to disk.
        offload_folder: where modules mapped to ``"disk"`` keep their weights (``vanilla/`` and ``unlearned/``
            below it; checkpoints stored as safetensors are read in place).
        adapter_base: the base checkpoint of an adapter ``unlearned`` (path, hub id or in-memory model; an
            in-memory one is copied, never modified); an :class:`~patchlab.pair.adapters.AdapterBaseWarning` when
            it is not the checkpoint the adapter config names. The provenance digest of the unlearned side then
            covers the adapter and this base (:func:`adapter_record`).
        sequential: never hold both models in memory: check the pair from configs, file headers and tokenizers and
            return a :class:`~patchlab.pair.sequential.SequentialPair` whose sweeps load the vanilla model, then the
            unlearned one (the vanilla weights that ``value`` / ``heads`` restorations need are read from its
            safetensors files). Needs checkpoint directories or hub ids; the same numbers, about half the memory.
            A ``device_map`` then places each model in turn with the whole ``max_memory`` budget (a 70B model on
            two 80 GB GPUs instead of four).

    Raises:
        PatchlabFileError: a path does not exist / holds no checkpoint, or a hub id cannot be reached (within
            :data:`HUB_TIMEOUT_S` seconds).
        PatchlabValueError: a ``device`` this machine lacks, ``device`` together with ``device_map``,
            ``max_memory`` / ``offload_folder`` without ``device_map``, a map that offloads to disk without
            ``offload_folder``, an adapter without a base.
        PairMismatchError: different architecture, layer count, hidden/intermediate/vocab size, parameter
            shapes, weight dtype (without ``dtype``), input device or tokenizer.
        UnsupportedArchitectureError: the family is not in the registry (see ``register_architecture``).
        MissingDependencyError: an adapter directory without ``peft`` installed.
    """
    _check_placement(device, device_map, max_memory, offload_folder)
    adapter_dir = local_adapter(unlearned)
    if adapter_dir is not None:
        adapter_base = adapter_base_for(adapter_dir, adapter_base, vanilla)
    if sequential:
        tok = _pair_tokenizer(vanilla, unlearned, tokenizer)
        shared_map, folders = _pair_placement(vanilla, device_map, max_memory, offload_folder, dtype, share=1)
        loads = [{"dtype": dtype, "device": device, **({"device_map": shared_map, "offload_folder": folder}
                                                       if shared_map is not None else {})} for folder in folders]
        return sequential_pair(vanilla, unlearned if adapter_dir is None else adapter_dir, tokenizer=tok,
                               load=loads, adapter_base=adapter_base,
                               adapter=None if adapter_dir is None else adapter_record(adapter_dir, adapter_base))
    shared_map, folders = _pair_placement(vanilla, device_map, max_memory, offload_folder, dtype)
    # the unlearned side first: an adapter may copy the in-memory vanilla model before it is dispatched
    with warnings.catch_warnings():  # a foreign adapter base was announced above, once
        warnings.simplefilter("ignore", AdapterBaseWarning)
        model_u = load_model(unlearned if adapter_dir is None else adapter_dir, dtype=dtype, device=device,
                             device_map=shared_map, offload_folder=folders[1], adapter_base=adapter_base)
    model_v = load_model(vanilla, dtype=dtype, device=device, device_map=shared_map, offload_folder=folders[0])
    if model_v is model_u:
        raise PairMismatchError("vanilla and unlearned are the same model object; pass two distinct models")
    check_compatible(model_v, model_u)
    spec = arch_spec(model_v)
    tok = _pair_tokenizer(vanilla, unlearned, tokenizer)
    check_vocab_size(tok, model_v.config)
    return ModelPair(vanilla=trace_model(model_v, tok), unlearned=trace_model(model_u, tok),
                     vanilla_hf=model_v, unlearned_hf=model_u, tokenizer=tok, arch=spec,
                     sources=(describe_source(vanilla), describe_source(unlearned)),
                     adapter=None if adapter_dir is None else adapter_record(adapter_dir, adapter_base))


def _checkpoint_dir(spec: Any, what: str) -> Path:
    """A local checkpoint directory for ``spec``: the directory itself, or a hub id's local snapshot."""
    if isinstance(spec, PreTrainedModel):
        raise PatchlabValueError(f"sequential=True reads the {what} checkpoint from its files: pass a directory or "
                                 "a hub id, not an in-memory model")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    _source(spec, what)  # a missing local path fails here with a clear error
    return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


#: safetensors dtype names of floating-point tensors -> torch dtype names.
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2"}


def stored_dtypes(tensors: CheckpointTensors) -> list[str]:
    """The dtypes of a checkpoint's floating-point tensors as stored (``["bfloat16"]``, sorted torch names)."""
    return sorted({_FLOAT_DTYPES[d] for d in tensors.dtypes.values() if d in _FLOAT_DTYPES})


def sequential_pair(vanilla: Any, unlearned: Any, *, tokenizer: PreTrainedTokenizerBase,
                    load: Sequence[Mapping[str, Any]], adapter_base: Any = None,
                    adapter: dict[str, str] | None = None) -> SequentialPair:
    """Check a pair from its configs and file headers and return it unloaded (:class:`SequentialPair`); ``load``
    holds the vanilla and the unlearned model's :func:`load_model` keyword arguments. ``unlearned`` may be a local
    PEFT adapter directory, merged onto ``adapter_base`` (default the vanilla checkpoint) when loaded; ``adapter``:
    its record for provenance.

    Raises:
        PatchlabValueError: an in-memory model (it is in memory already: use ``sequential=False``).
        PairMismatchError: different architectures, sizes, tensor shapes, or stored weight dtypes when the pair is
            loaded as stored (no ``dtype``).
        PatchlabFileError: a directory that does not exist, holds no safetensors checkpoint or a truncated / corrupt
            one (named), or a config transformers cannot read (an unknown ``model_type``).
    """
    v_dir = _checkpoint_dir(vanilla, "vanilla")
    u_dir = Path(unlearned) if is_adapter(unlearned) else _checkpoint_dir(unlearned, "unlearned")
    config = _from_pretrained(AutoConfig, v_dir, "vanilla model config")
    skeleton = meta_skeleton(config)
    spec = arch_spec(skeleton)
    tensors_v = CheckpointTensors(v_dir, "vanilla")
    if not is_adapter(unlearned):
        check_configs(config, _from_pretrained(AutoConfig, u_dir, "unlearned model config"))
        tensors_u = CheckpointTensors(u_dir, "unlearned")
        for name, shape in tensors_v.shapes.items():
            if name in tensors_u.shapes and tensors_u.shapes[name] != shape:
                raise PairMismatchError(f"tensor {name} has shape {shape} in vanilla but {tensors_u.shapes[name]} in "
                                        "unlearned")
        if load[0].get("dtype") is None:
            check_dtypes(stored_dtypes(tensors_v), stored_dtypes(tensors_u))
    else:
        check_safetensors(u_dir, f"the adapter {str(u_dir)!r}")  # now, not when a sweep first loads it
    check_vocab_size(tokenizer, config)
    load_u = {**load[1], **({"adapter_base": adapter_base or v_dir} if is_adapter(unlearned) else {})}
    return SequentialPair(specs={"vanilla": v_dir, "unlearned": u_dir}, load={"vanilla": dict(load[0]),
                                                                             "unlearned": load_u},
                          tokenizer=tokenizer, arch=spec, sources=(describe_source(v_dir), describe_source(unlearned)),
                          skeleton=skeleton, loader=load_model, dtype=load[0].get("dtype"), adapter=adapter)
