"""Loading a vanilla checkpoint and its unlearned copy as one traced, validated pair."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from nnsight import TransformersModel
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from patchlab.errors import PairMismatchError, PatchlabFileError, PatchlabValueError
from patchlab.pair.adapters import adapter_base_name, is_adapter, merge_adapter, same_checkpoint
from patchlab.pair.arch import ArchSpec, arch_spec
from patchlab.pair.placement import (DeviceMap, check_device, check_offload_folder, dispatch, input_device,
                                     is_dispatched, resolve_device_map)
from patchlab.pair.sequential import SequentialPair, meta_skeleton, sequential_pair
from patchlab.pair.weights import ModelWeights
from patchlab.provenance import describe_source

ModelSpec = Union[str, os.PathLike, PreTrainedModel]
TokenizerSpec = Union[str, os.PathLike, PreTrainedTokenizerBase, None]


#: Seconds to wait for the Hugging Face hub to answer before a hub id is declared unreachable.
HUB_TIMEOUT_S = 3.0


def is_hub_id(spec: str | os.PathLike) -> bool:
    """True when ``spec`` has the shape of a hub id and not of a local path.

    A hub id is a string ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``, as
    ``huggingface_hub`` validates it). A path object, a string starting with ``.``, ``/`` or ``~``, with a
    backslash or with more than one ``/``, and an ``org/name`` whose ``org`` is an existing local directory
    (``runs/graddiff`` next to a ``runs/`` folder) are local paths.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(spec, str) or spec.startswith((".", "/", "~")) or "\\" in spec:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return "/" not in spec or not Path(spec.split("/")[0]).is_dir()


@functools.lru_cache(maxsize=8)
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, proxy) means unreachable
        return False
    return True


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers one HEAD request within ``timeout`` seconds (through
    the hub client's own session, so proxies apply); the answer is remembered for the process. False in offline
    mode (``HF_HUB_OFFLINE=1``) without any request."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _endpoint_reachable(constants.ENDPOINT, timeout)


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
    """``loader.from_pretrained(spec)`` with a patchlab error for a missing directory or unreachable hub id."""
    source, offline = _source(spec, what)
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return loader.from_pretrained(source, **kwargs)
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


def _adapter_model(adapter_dir: str | os.PathLike, base: ModelSpec | None, dtype: torch.dtype | None
                   ) -> PreTrainedModel:
    """The base model of a PEFT adapter directory with the adapter merged
    (:func:`patchlab.pair.adapters.merge_adapter`), loaded whole on the CPU (an in-memory base is copied)."""
    name = adapter_base_name(adapter_dir)
    if base is None and name is None:
        raise PatchlabValueError(f"the adapter {str(adapter_dir)!r} names no base model (base_model_name_or_path): "
                                 "pass adapter_base=... (the checkpoint it was trained on)")
    base = name if base is None else base
    if isinstance(base, PreTrainedModel):
        model = copy.deepcopy(base)
    elif is_adapter(base):
        raise PatchlabValueError(f"the base of adapter {str(adapter_dir)!r} is itself an adapter ({str(base)!r})")
    else:
        model = load_model(base, dtype=dtype)
    return merge_adapter(model, adapter_dir)


def load_model(spec: ModelSpec, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               device_map: DeviceMap | None = None, max_memory: Mapping[Any, Any] | None = None,
               offload_folder: str | os.PathLike | None = None, adapter_base: ModelSpec | None = None
               ) -> PreTrainedModel:
    """A Hugging Face causal LM in eval mode, from a local directory, a hub id, a PEFT adapter directory, or an
    in-memory model.

    * A directory holding ``adapter_config.json`` is a PEFT adapter (LoRA...): its base model (``adapter_base``,
      default the adapter config's ``base_model_name_or_path``) is loaded and the adapter merged into it with
      ``peft``'s ``merge_and_unload`` (:func:`patchlab.pair.adapters.merge_adapter`), so the result has the base
      model's ordinary modules and weights ``W + ΔW``: patching a merged adapter is patching a full checkpoint.
      Needs ``pip install 'patchlab[peft]'``.
    * ``device_map`` (``"auto"`` or ``{module name: device}``) places the model with Accelerate's big-model
      dispatch (``from_pretrained(device_map=...)``; ``dispatch_model`` for in-memory models, placed in place,
      and merged adapters, which pass through the CPU whole), within ``max_memory`` (``{0: "20GiB", "cpu":
      "60GiB"}``), modules mapped to ``"disk"`` keeping their weights in ``offload_folder``.
    * Otherwise an in-memory model is returned as is, converted in place when ``dtype``/``device`` are given.

    Raises:
        PatchlabFileError: the directory does not exist or holds no loadable checkpoint, or the hub id cannot be
            reached (after at most :data:`HUB_TIMEOUT_S` seconds).
        PatchlabValueError: ``spec`` is of another type, a ``device`` this machine lacks, ``device`` together
            with ``device_map``, ``max_memory`` or ``offload_folder`` without ``device_map``, a map that offloads
            to disk without ``offload_folder``, an adapter that names no base model (pass ``adapter_base``) or
            does not fit it.
        MissingDependencyError: an adapter directory without ``peft`` installed.
    """
    _check_placement(device, device_map, max_memory, offload_folder)
    if isinstance(spec, PreTrainedModel):
        model = spec
    elif is_adapter(spec):
        model = _adapter_model(spec, adapter_base, dtype)
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
        if dtype is not None:
            model = model.to(dtype=dtype)
        model = dispatch(model, resolve_device_map(model, device_map, max_memory=max_memory, dtype=dtype),
                         offload_folder=offload_folder)
    elif device_map is None and (dtype is not None or device is not None):
        if is_dispatched(model):
            raise PatchlabValueError("the model is placed with a device map: it cannot be moved with dtype=/device=")
        model = model.to(device=device, dtype=dtype)
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
    """Raise :class:`PairMismatchError` unless both models share architecture, sizes and parameter shapes."""
    check_configs(vanilla.config, unlearned.config)
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
    """

    vanilla: TransformersModel
    unlearned: TransformersModel
    vanilla_hf: PreTrainedModel
    unlearned_hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    sources: tuple[str, str] = ("", "")

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
        unlearned: same, or a PEFT adapter directory (one holding ``adapter_config.json``, e.g. a LoRA run). An
            adapter is applied to its base model and **merged** (``peft``'s ``merge_and_unload``): the unlearned
            model is then an ordinary model with weights ``W + ΔW``, so every site (coefficients, value vectors,
            attention outputs) is patched exactly as in a full checkpoint. Its base is ``adapter_base`` when given,
            else the vanilla model when the adapter config's ``base_model_name_or_path`` names the vanilla
            checkpoint (same string, same directory, or the path an in-memory vanilla was loaded from), else that
            checkpoint itself (loaded from its path or the hub). Needs ``pip install 'patchlab[peft]'``.
        tokenizer: shared tokenizer (object, directory or hub id). Defaults to the vanilla checkpoint's; when
            both checkpoints ship a tokenizer they must agree.
        dtype: load/cast both models to this dtype (e.g. ``torch.bfloat16``); default: as stored.
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
            in-memory one is copied, never modified).
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
            shapes, input device or tokenizer.
        UnsupportedArchitectureError: the family is not in the registry (see ``register_architecture``).
        MissingDependencyError: an adapter directory without ``peft`` installed.
    """
    _check_placement(device, device_map, max_memory, offload_folder)
    if sequential:
        tok = _pair_tokenizer(vanilla, unlearned, tokenizer)
        shared_map, folders = _pair_placement(vanilla, device_map, max_memory, offload_folder, dtype, share=1)
        loads = [{"dtype": dtype, "device": device, **({"device_map": shared_map, "offload_folder": folder}
                                                       if shared_map is not None else {})} for folder in folders]
        return sequential_pair(vanilla, unlearned, tokenizer=tok, load=loads, adapter_base=adapter_base)
    if adapter_base is None and is_adapter(unlearned) and same_checkpoint(adapter_base_name(unlearned), vanilla):
        adapter_base = vanilla
    shared_map, folders = _pair_placement(vanilla, device_map, max_memory, offload_folder, dtype)
    # the unlearned side first: an adapter may copy the in-memory vanilla model before it is dispatched
    model_u = load_model(unlearned, dtype=dtype, device=device, device_map=shared_map, offload_folder=folders[1],
                         adapter_base=adapter_base)
    model_v = load_model(vanilla, dtype=dtype, device=device, device_map=shared_map, offload_folder=folders[0])
    if model_v is model_u:
        raise PairMismatchError("vanilla and unlearned are the same model object; pass two distinct models")
    check_compatible(model_v, model_u)
    spec = arch_spec(model_v)
    tok = _pair_tokenizer(vanilla, unlearned, tokenizer)
    check_vocab_size(tok, model_v.config)
    return ModelPair(vanilla=trace_model(model_v, tok), unlearned=trace_model(model_u, tok),
                     vanilla_hf=model_v, unlearned_hf=model_u, tokenizer=tok, arch=spec,
                     sources=(describe_source(vanilla), describe_source(unlearned)))
