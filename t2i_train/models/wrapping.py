"""How each transformer block runs: activation-checkpointing policy and regional compilation.

Both act per block (the torchtitan way), so FSDP2 still shards blocks, compile time stays that of one block
per block class, and the state-dict keys never change.

Policies:
  none       keep every activation.
  selective  keep the outputs of the expensive contractions (matmuls with a long reduction, attention) and
             of the native fused pixel MLP, recompute everything else in backward: norms, modulations'
             elementwise work, residuals (and the pixel-level MLP where it runs op by op or in Python loops:
             its matmuls contract only D_pix channels).
             Under autocast the low-precision copies of parameters are kept too: the forward makes them
             anyway and the backward needs them, their size is the block's parameter count (not growing
             with batch or resolution), and recasting them is a pass over the weights for nothing.
             Eager blocks apply it from their structure (models.recompute: no per-op dispatch mode; only
             the attention core goes through the op-by-op policy below); compiled blocks and the op-by-op
             pixel path use the policy below throughout.
  full       keep only the block's inputs; recompute the whole block in backward.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_POLICIES = ("none", "selective", "full")

# A matmul whose reduction is at least this long is worth keeping (2·K FLOPs per stored element). Shorter
# ones are the pixel MLP's (D_pix and 4·D_pix = 64 for D_pix 16): cheap to redo, and their outputs are
# per-pixel tensors, the largest activations of the model.
MIN_SAVED_REDUCTION = 128

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default: 1, _aten.addmm.default: 2, _aten.bmm.default: 1, _aten.baddbmm.default: 2}
_ATTENTION = {
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def normalize_ac_policy(value) -> str:
    """A policy name from config: 'none' | 'selective' | 'full', or the older boolean (true = 'full')."""
    if isinstance(value, bool) or value is None:
        return "full" if value else "none"
    if value not in AC_POLICIES:
        raise ValueError(f"activation checkpointing must be one of {list(AC_POLICIES)} (or a boolean), "
                         f"got {value!r}")
    return value


# Kept under `selective` besides matmuls and attention: the native fused pixel MLP (models.fused with
# models.native), whose recomputation costs as much as the rest of the block's recomputed work together, for
# two per-pixel tensors (its residual sum and MLP input) and a statistic per pixel.
_KEPT_NATIVE = {"pixdit_fused::mlp_residual_fwd"}


def _is_parameter_cast(op, args, kwargs) -> bool:
    """A dtype cast of a parameter or of a view of one (autocast's bf16 copy of a weight)."""
    if op is not _aten._to_copy.default:
        return False
    src, dtype = args[0], kwargs.get("dtype")
    if dtype is None or dtype == src.dtype:
        return False
    return isinstance(src, torch.nn.Parameter) or isinstance(getattr(src, "_base", None), torch.nn.Parameter)


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op.namespace == "pixdit_fused" and op.name() in _KEPT_NATIVE:
        return CheckpointPolicy.MUST_SAVE
    if _is_parameter_cast(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMULS:
        lhs = args[_MATMULS[op] - 1]
        if lhs.shape[-1] >= MIN_SAVED_REDUCTION:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


def selective_region(fn, *args):
    """`fn(*args)` under the selective policy (op by op, through a dispatch mode)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts)


def run_block(policy: str, block, *args):
    """Call `block(*args)` under the activation-checkpointing `policy` (plain call without autograd).
    Blocks with `recompute_regions` set apply `selective` themselves (models.recompute)."""
    if policy == "none" or not torch.is_grad_enabled():
        return block(*args)
    if policy == "selective":
        if getattr(block, "recompute_regions", False) and not torch.compiler.is_compiling():
            return block(*args)
        return selective_region(block, *args)
    return checkpoint(block, *args, use_reentrant=False)


def set_recompute_regions(blocks, policy: str, compiled: bool) -> None:
    """Under `selective`, eager blocks that can (patch and pixel blocks) apply it from their structure."""
    for block in blocks:
        if hasattr(block, "recompute_regions"):
            block.recompute_regions = policy == "selective" and not compiled


def compile_wanted(setting, device) -> bool:
    """`model.compile` / `--compile`: true, false, or auto (None): on where it pays, i.e. on CUDA (on CPU
    inductor's compile time outweighs what it saves in short runs)."""
    if setting in (None, "auto"):
        return torch.device(device).type == "cuda"
    if isinstance(setting, str):
        if setting not in ("on", "off", "true", "false"):
            raise ValueError(f"compile must be auto, on or off, got {setting!r}")
        return setting in ("on", "true")
    return bool(setting)


def compile_blocks(blocks) -> None:
    """Compile each block's `forward` in place: module hooks (FSDP2's all-gathers) stay outside the compiled
    region, parameters and names are untouched, and blocks of one class share one graph."""
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False)

