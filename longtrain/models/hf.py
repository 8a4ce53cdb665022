"""Hugging Face conversion: local ``config.json`` + safetensors <-> :class:`Transformer`.

Parameter names are identical on both sides (but for MoE experts, below), so weights are copied
without renaming or permutation. Supported model types: llama, qwen2 (q/k/v bias), qwen3 (q/k
norm), and the MoE types qwen3_moe and mixtral.

MoE weights. The model stacks each layer's experts (``mlp.experts.gate_up_proj`` [E, 2I, H], gate
rows first, and ``mlp.experts.down_proj`` [E, H, I]), as transformers 5 does in memory. Checkpoints
on disk (and transformers 5's own ``save_pretrained``) keep one tensor per expert; they are written
that way and read either way. With P the file prefix of a layer's block, ``mlp`` for qwen3_moe and
``block_sparse_moe`` for mixtral (``model.layers.{i}.`` omitted):

- ``mlp.gate.weight`` <-> ``P.gate.weight``
- ``mlp.experts.gate_up_proj[e, :I]`` <-> ``P.experts.{e}.gate_proj.weight`` (mixtral: ``w1``)
- ``mlp.experts.gate_up_proj[e, I:]`` <-> ``P.experts.{e}.up_proj.weight`` (mixtral: ``w3``)
- ``mlp.experts.down_proj[e]`` <-> ``P.experts.{e}.down_proj.weight`` (mixtral: ``w2``)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longtrain.models.args import MOE_ARCHS, ModelArgs
from longtrain.models.llama import Transformer
from longtrain.models.rope import ROPE_TYPES

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# Per-expert file names: (prefix replacing "mlp.", gate, up, down) for each MoE model type.
_EXPERT_FILE_NAMES = {"qwen3_moe": ("mlp.", "gate_proj", "up_proj", "down_proj"),
                      "mixtral": ("block_sparse_moe.", "w1", "w3", "w2")}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PathLike = Union[str, Path]


def _unsupported(what: str) -> ValueError:
    return ValueError(f"model.hf_path: {what} is not supported by longtrain's Transformer")


def _rope_from_hf(cfg: Dict[str, Any]):
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise _unsupported(f"rope_type {rope_type!r} (supported: default, {', '.join(ROPE_TYPES)})")
    spec = ROPE_TYPES[rope_type]
    scaling = {k: params[k] for k in (*spec["required"], *spec["optional"]) if params.get(k) is not None}
    if "original_max_position_embeddings" in spec["required"]:
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return theta, {"rope_type": rope_type, **scaling}


def args_from_hf_config(cfg: Dict[str, Any]) -> ModelArgs:
    """:class:`ModelArgs` from the dict of an HF ``config.json`` (transformers 4 or 5 format).

    Raises:
        ValueError: unsupported model_type or feature (sliding window, MLP/output biases, non-SiLU
            activation, RoPE other than default/linear/yarn/llama3), or a missing required key.
    """
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model.hf_path: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(ARCHITECTURES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"model.hf_path: config.json lacks {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias"):
        raise _unsupported("mlp_bias")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise _unsupported(f"attention_bias for {model_type} (it also puts a bias on o_proj)")
    if cfg.get("use_sliding_window") or (model_type == "mixtral" and cfg.get("sliding_window")):
        raise _unsupported("use_sliding_window")
    theta, scaling = _rope_from_hf(cfg)
    moe = _moe_from_hf(cfg) if model_type in MOE_ARCHS else {}
    return ModelArgs(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "qwen3_moe"),
        init_std=cfg.get("initializer_range", 0.02), arch=model_type, **moe)


def _moe_from_hf(cfg: Dict[str, Any]) -> Dict[str, Any]:
    if cfg.get("router_jitter_noise"):
        raise _unsupported("router_jitter_noise")
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not num_experts or not cfg.get("num_experts_per_tok"):
        raise ValueError("model.hf_path: config.json lacks num_experts/num_local_experts or num_experts_per_tok")
    moe = dict(num_experts=num_experts, top_k=cfg["num_experts_per_tok"])
    if cfg["model_type"] == "mixtral":  # every layer MoE, experts as wide as intermediate_size, weights renormalised
        return dict(moe, moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    return dict(moe, moe_intermediate_size=cfg.get("moe_intermediate_size"),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_layer_step=cfg.get("decoder_sparse_step", 1), dense_layers=tuple(cfg.get("mlp_only_layers") or ()))


def hf_config_from_args(args: ModelArgs, dtype: Optional[torch.dtype] = None, bos_token_id: Optional[int] = None,
                        eos_token_id: Optional[int] = None) -> Dict[str, Any]:
    """The ``config.json`` dict of ``args`` for ``model_type = args.arch``.

    Args:
        args: the model geometry.
        dtype: dtype of the saved weights (written as ``dtype`` and ``torch_dtype``); None: float32.
        bos_token_id: tokenizer BOS id, or None.
        eos_token_id: tokenizer EOS id, or None.

    Raises:
        ValueError: ``args`` uses a feature the HF class of ``args.arch`` lacks (llama, mixtral: no
            qkv bias or qk norm; qwen2: qkv bias and no qk norm; qwen3, qwen3_moe: qk norm and no
            qkv bias; experts only for qwen3_moe and mixtral, shared experts for neither; mixtral:
            every layer MoE with renormalised top-k weights).
    """
    wants = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True), "qwen3_moe": (False, True),
             "mixtral": (False, False)}[args.arch]
    if (args.qkv_bias, args.qk_norm) != wants:
        raise ValueError(f"model.arch: {args.arch} export needs qkv_bias={wants[0]} and qk_norm={wants[1]}, got "
                         f"qkv_bias={args.qkv_bias}, qk_norm={args.qk_norm}; pick the arch that matches")
    moe_arch = args.arch in MOE_ARCHS
    if moe_arch != bool(args.num_experts):
        raise ValueError(f"model.moe.num_experts: {args.arch} export needs "
                         f"{'experts' if moe_arch else 'a dense model'}, got num_experts={args.num_experts}; pick "
                         f"{'a dense arch' if args.num_experts else 'qwen3_moe or mixtral'}")
    if args.num_shared_experts:
        raise ValueError(f"model.moe.num_shared_experts: {args.arch} has no shared experts; set it to 0 to export")
    if args.arch == "mixtral" and (len(args.moe_layers) != args.num_layers or not args.norm_topk_prob):
        raise ValueError("model.arch: mixtral export needs every layer MoE and norm_topk_prob=True; use qwen3_moe")
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope_parameters.update(args.rope_scaling)
    cfg = {
        "architectures": [ARCHITECTURES[args.arch]], "model_type": args.arch,
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": args.rms_norm_eps,
        "initializer_range": args.init_std, "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling and dict(args.rope_scaling),  # < 5
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }
    if args.arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if args.arch == "llama":
        cfg["mlp_bias"] = False
    elif args.arch == "mixtral":
        cfg.update(sliding_window=None, num_local_experts=args.num_experts, num_experts_per_tok=args.top_k,
                   intermediate_size=args.expert_size, router_jitter_noise=0.0)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.num_layers)
    if args.arch == "qwen3_moe":
        cfg.update(num_experts=args.num_experts, num_experts_per_tok=args.top_k,
                   moe_intermediate_size=args.expert_size, norm_topk_prob=args.norm_topk_prob,
                   decoder_sparse_step=args.moe_layer_step, mlp_only_layers=list(args.dense_layers))
    return cfg


def _file_layout(model: Transformer) -> Dict[str, Tuple[str, Tuple]]:
    """File tensor name -> (model state-dict name, index into it) for the per-expert tensors of
    ``model.args.arch``'s checkpoints (module docstring); other names map to themselves whole."""
    args = model.args
    if args.arch not in _EXPERT_FILE_NAMES:
        return {}
    prefix, gate, up, down = _EXPERT_FILE_NAMES[args.arch]
    inner = args.expert_size
    layout = {}
    for i in args.moe_layers:
        ours, theirs = f"model.layers.{i}.mlp.", f"model.layers.{i}.{prefix}"
        layout[theirs + "gate.weight"] = (ours + "gate.weight", ())
        for e in range(args.num_experts):
            layout[f"{theirs}experts.{e}.{gate}.weight"] = (ours + "experts.gate_up_proj", (e, slice(0, inner)))
            layout[f"{theirs}experts.{e}.{up}.weight"] = (ours + "experts.gate_up_proj", (e, slice(inner, 2 * inner)))
            layout[f"{theirs}experts.{e}.{down}.weight"] = (ours + "experts.down_proj", (e,))
    return layout


_WEIGHTS_NEEDED = (f"the directory must hold config.json and the weights as save_pretrained writes them: {SINGLE_FILE}, "
                   f"or model-*.safetensors shards with {INDEX_FILE} (.bin and .pt weights are not read)")


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"model.hf_path: '{file}' is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"restore the model's {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"model.hf_path: '{file}' is not UTF-8 text; restore the model's {what}") from None


def read_hf_config(path: PathLike) -> Dict[str, Any]:
    """The dict of ``path/config.json``.

    Raises:
        ValueError: no such directory or file, or a file that is not a JSON object, naming the path.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.hf_path: no config.json in '{path}' (expected a local Hugging Face model directory)")
    cfg = _read_json(config_file, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"model.hf_path: '{config_file}' holds a JSON {type(cfg).__name__}, not an object; "
                         "restore the model's config.json")
    return cfg


_read_config = read_hf_config


def _weight_files(path: PathLike) -> List[Path]:
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        index = _read_json(root / INDEX_FILE, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"model.hf_path: '{root / INDEX_FILE}' has no weight_map; restore the model's {INDEX_FILE}")
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"model.hf_path: {INDEX_FILE} in '{path}' names {len(missing)} missing shard(s), e.g. "
                             f"{', '.join(missing[:3])}; copy every shard into the directory")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    raise ValueError(f"model.hf_path: neither {SINGLE_FILE} nor {INDEX_FILE} in '{path}'; {_WEIGHTS_NEEDED}")


def check_safetensors_file(file: Path) -> None:
    """Check that ``file``'s safetensors header reads and that the file is as long as it says
    (reads the header only).

    Raises:
        ValueError: a truncated or damaged file, naming it.
    """
    size = file.stat().st_size
    fix = "copy the file again"
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                raise ValueError("no complete header")
            header = json.loads(f.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise ValueError(f"model.hf_path: '{file}' is not a readable safetensors file (its header is damaged or the "
                         f"file is truncated, {size} bytes); {fix}") from None
    if size < 8 + length + end:
        raise ValueError(f"model.hf_path: '{file}' is truncated ({size} bytes, its header describes "
                         f"{8 + length + end}); {fix}")


def check_hf_dir(path: PathLike) -> None:
    """Everything about the Hugging Face directory ``path`` that can be checked without loading
    weights: config.json, a supported geometry, the weight files and their headers and sizes.

    Raises:
        ValueError: naming ``model.hf_path``, the file and what the directory must hold.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"model.hf_path: '{path}' does not exist (expected a local Hugging Face model directory)")
    if not root.is_dir():
        raise ValueError(f"model.hf_path: '{path}' is not a directory (expected a local Hugging Face model directory)")
    args_from_hf_config(read_hf_config(root))
    for file in _weight_files(root):
        check_safetensors_file(file)


@torch.no_grad()
def load_hf_weights(model: Transformer, path: PathLike) -> None:
    """Copy the safetensors weights of the HF directory ``path`` into ``model`` (cast to its dtype).

    A tied model ignores a stored ``lm_head.weight``; old checkpoints' ``rotary_emb.inv_freq``
    entries are ignored. MoE experts load from per-expert tensors or stacked ones (module docstring).

    Raises:
        ValueError: no weight files, a tensor with no counterpart, a shape mismatch (naming the
            tensor), or model parameters the checkpoint lacks.
    """
    targets = model.state_dict()  # detached views sharing storage with the parameters
    tied = model.args.tie_embeddings
    layout = _file_layout(model)
    # A target is complete when every piece of it was read: stacked experts by all their
    # per-expert tensors or by the stacked one.
    pieces: Dict[str, set] = {name: {name} for name in targets if not (tied and name == "lm_head.weight")}
    for file_name, (target, _) in layout.items():
        pieces[target] = pieces[target] - {target} | {file_name}
    loaded = set()
    for file in _weight_files(path):
        try:
            _copy_tensors(file, targets, layout, pieces, loaded, tied)
        except SafetensorError as e:
            raise ValueError(f"model.hf_path: '{file}' is not a readable safetensors file ({e}); it is probably "
                             "truncated: copy the file again") from None
    missing = sorted(name for name, need in pieces.items() if not need <= loaded)
    if missing:
        raise ValueError(f"model.hf_path: '{path}' lacks {len(missing)} model tensors, e.g. {', '.join(missing[:3])}")


def _copy_tensors(file: Path, targets, layout, pieces, loaded: set, tied: bool) -> None:
    """Copy the tensors of one weight file into ``targets``, recording what was read in ``loaded``."""
    with safe_open(str(file), framework="pt") as reader:
        for name in reader.keys():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            target, index = layout.get(name, (name, ()))
            if target not in targets:
                raise ValueError(f"model.hf_path: tensor {name!r} in {file} has no counterpart in the model "
                                 f"(is the config's architecture right?)")
            tensor, dest = reader.get_tensor(name), targets[target][index]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"model.hf_path: tensor {name!r} has shape {tuple(tensor.shape)} in {file}, the "
                                 f"model expects {tuple(dest.shape)}; check the model geometry")
            dest.copy_(tensor)
            loaded.update(pieces[target] if name == target else {name})


def from_hf(path: PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a :class:`Transformer` from a local HF directory (config.json + safetensors, single or
    sharded with ``model.safetensors.index.json``), on CPU in ``dtype``.

    Raises:
        ValueError: missing directory/config/weights, unsupported model_type, or mismatched tensors.
    """
    args = args_from_hf_config(_read_config(path))
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.tie_weights()
    model.reset_rope()
    load_hf_weights(model, path)
    return model


def to_hf(model: Transformer, path: PathLike, dtype: Optional[torch.dtype] = None,
          max_shard_bytes: Optional[int] = None, bos_token_id: Optional[int] = None,
          eos_token_id: Optional[int] = None) -> None:
    """Write ``model`` as an HF directory that ``AutoModelForCausalLM.from_pretrained(path)`` loads.

    Args:
        model: the model to export (its ``args.arch`` gives the HF model_type).
        path: output directory (created; previous weight files of this layout are replaced).
        dtype: dtype of the written weights; None keeps the parameters' dtype.
        max_shard_bytes: split the weights into shards of at most this size (a tensor larger than
            it gets a shard of its own) plus ``model.safetensors.index.json``; None writes one file.
        bos_token_id: written to config.json.
        eos_token_id: written to config.json.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {}
    params = model.state_dict()
    by_target: Dict[str, List[Tuple[str, Tuple]]] = {}
    for file_name, (target, index) in _file_layout(model).items():
        by_target.setdefault(target, []).append((file_name, index))
    for name, tensor in params.items():
        if model.args.tie_embeddings and name == "lm_head.weight":
            continue  # safetensors refuses shared storage; HF re-ties from tie_word_embeddings
        for file_name, index in by_target.get(name, [(name, ())]):
            state[file_name] = tensor.detach()[index].to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    for stale in [root / SINGLE_FILE, root / INDEX_FILE, *root.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    saved_dtype = next(iter(state.values())).dtype
    cfg = hf_config_from_args(model.args, dtype=saved_dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(root / SINGLE_FILE), metadata=metadata)
        return
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive or None, got {max_shard_bytes}")
    shards: List[List[str]] = [[]]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    weight_map = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(root / file_name), metadata=metadata)
        weight_map.update({n: file_name for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
