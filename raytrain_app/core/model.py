"""A pre-LayerNorm Transformer encoder over [T, F] feature sequences. Pure modules: no I/O, no Ray."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_app.core import tasks
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import CLASSIFICATION, DataShape, ModelSpec


class SelfAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # Fused attention (flash / memory-efficient kernels on CUDA); bidirectional: an encoder sees the whole window.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden_dim)
        self.attn = SelfAttention(hidden_dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, 4 * hidden_dim), nn.GELU(), nn.Linear(4 * hidden_dim, hidden_dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SequenceTransformer(nn.Module):
    """Input projection + learned positions + blocks; a per-sequence head (mean-pooled) or a per-step head."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        if min(cfg.feature_dim, cfg.seq_len, cfg.num_classes) <= 0:
            raise ValueError("feature_dim, seq_len and num_classes must be set from the data before building the model")
        self.per_step = cfg.per_step
        self.input_proj = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.hidden_dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden_dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_dim)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_classes)
        # Input standardisation (--normalize): the training split's per-feature mean and std, in the state dict so
        # that a checkpoint always carries the statistics its weights expect. Zeros and ones (--normalize none,
        # checkpoints from before normalisation) change nothing: x - 0 and x / 1 are exact.
        self.register_buffer("input_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("input_std", torch.ones(cfg.feature_dim))
        self.register_load_state_dict_pre_hook(_identity_normalization_if_absent)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, F] -> logits [B, C] (per sequence) or [B, T, C] (per step)."""
        x = (x - self.input_mean) / self.input_std
        h = self.drop(self.input_proj(x) + self.pos_emb[:, : x.shape[1]])
        for block in self.blocks:  # each block an FSDP unit and recomputed with --activation-checkpointing
            h = block(h)
        h = self.ln_f(h)
        return self.head(h if self.per_step else h.mean(dim=1))


NORMALIZATION_KEYS = ("input_mean", "input_std")


def set_normalization(model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Give `model` the input statistics it standardises its features with (see `feature_stats`)."""
    with torch.no_grad():
        model.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))


def has_input_stats(weight_names: Iterable[str]) -> bool:
    """Whether weights (their names) carry input statistics: False for checkpoints written before --normalize,
    whose weights expect the features as they are."""
    return set(NORMALIZATION_KEYS) <= set(weight_names)


def _identity_normalization_if_absent(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A state dict written before input normalisation existed loads as one that does not normalise."""
    for name in NORMALIZATION_KEYS:
        if prefix + name not in state_dict:
            state_dict[prefix + name] = getattr(module, name).detach().clone().fill_(0.0 if name == "input_mean"
                                                                                     else 1.0)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The built-in model's loss: cross-entropy (`core.tasks.loss_fn` for classification)."""
    return tasks.loss_fn(CLASSIFICATION, logits, y, reduction)


def arch_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The architecture fields readable from the weights' shapes (all but num_heads), for checkpoints without a
    config."""
    arch: dict[str, int] = {}
    if "input_proj.weight" in shapes:
        arch["hidden_dim"], arch["feature_dim"] = tuple(shapes["input_proj.weight"])
    if "pos_emb" in shapes:
        arch["seq_len"] = shapes["pos_emb"][1]
    if "head.weight" in shapes:
        arch["num_classes"] = shapes["head.weight"][0]
    layers = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    if layers:
        arch["num_layers"] = len(layers)
    return arch



@dataclass(frozen=True)
class TransformerArgs:
    """The built-in model's settings (the --hidden-dim, --num-layers and --num-heads flags)."""

    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4


def _transformer_config(shape: DataShape, args: TransformerArgs, dropout: float = 0.0) -> TrainConfig:
    seq_len, feature_dim = shape.input_shape
    return TrainConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers, num_heads=args.num_heads,
                       dropout=dropout, seq_len=seq_len, feature_dim=feature_dim, num_classes=shape.num_classes,
                       per_step=shape.per_step)


def build_transformer(shape: DataShape, args: TransformerArgs, dropout: float) -> SequenceTransformer:
    if len(shape.input_shape) != 2:
        raise ValueError(f"the built-in transformer reads sequences [T, F]; these inputs are {list(shape.input_shape)}")
    return SequenceTransformer(_transformer_config(shape, args, dropout))


def transformer_flops_per_token(num_params: int, num_layers: int, hidden_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's 12 x layers x width x
    sequence length (the PaLM paper's estimate)."""
    return 6 * num_params + 12 * num_layers * hidden_dim * seq_len


def _transformer_flops_per_sample(shape: DataShape, args: TransformerArgs) -> float:
    from raytrain_app.core.memory import count_parameters

    params, _ = count_parameters(_transformer_config(shape, args))
    return shape.input_shape[0] * transformer_flops_per_token(params, args.num_layers, args.hidden_dim,
                                                              shape.input_shape[0])


# The built-in model, `--model transformer` (the default): the first plug-in like any other.
TRANSFORMER = ModelSpec(build=build_transformer, task=CLASSIFICATION, args=TransformerArgs,
                        shard_units=lambda model: model.blocks, flops_per_sample=_transformer_flops_per_sample,
                        standardizes_inputs=True)
