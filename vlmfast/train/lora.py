"""LoRA adapters on the Linear layers of vlmfast's models, merged back into the weights on save.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,   A (r, K) kaiming-uniform, B (N, r) zeros

(peft's defaults: a fresh adapter changes nothing). Targets use Hugging Face / peft names
("q_proj", "gate_proj", ...). Our models fuse q/k/v into one `qkv` Linear and gate/up into one
`gate_up` Linear; an adapter on "k_proj" is then an (A, B) pair that writes only the k rows of
the fused output, so merging gives exactly the weight peft would give on the unfused model
(SmolVLM's GQA decoder: qkv rows are [H*E | Hkv*E | Hkv*E]).

An adapted layer is a LoRALinear: an nn.Linear subclass holding the same weight and bias
Parameters (state-dict keys unchanged) plus lora_A.<target> / lora_B.<target> Parameters. Code
that calls the layer, or smolvlm.packing.linear with it, gets the adapter term; the base weight
is frozen, so the backward runs no dW GEMM.
"""

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# Every Linear of a transformer block (attention and MLP) in every tower; "proj" (SmolVLM's
# connector) is left to callers who want it.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
                   "fc1", "fc2")
KNOWN_TARGETS = DEFAULT_TARGETS + ("proj",)

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


class LoRALinear(nn.Linear):
    """A Linear (N outputs, K inputs) with low-rank adapters on some row slices of its output.

    slices: the layer's layout, {name: (start, stop)} over its N output rows in order (one entry
    covering all rows for a plain layer; q/k/v or gate/up for a fused one); adapted: the names
    that get an adapter. x (..., K) -> (..., N).
    """

    def __init__(self, base: nn.Linear, slices: dict, adapted: Iterable[str], rank: int, alpha: float,
                 dropout: float):
        nn.Module.__init__(self)  # no nn.Linear.__init__: the base's Parameters are reused, not reallocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = dict(slices)
        self.adapted = [name for name in self.slices if name in set(adapted)]
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.adapted:
            start, stop = self.slices[name]
            a = torch.empty(rank, self.in_features, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft and nn.Linear initialise
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, **kw))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora={self.adapted}, rank={self.rank}, alpha={self.alpha}"

    def stacked_A(self) -> torch.Tensor:
        """(S * r, K): every adapter's A, in layout order."""
        return torch.cat([self.lora_A[name] for name in self.adapted], dim=0)

    def block_B(self) -> torch.Tensor:
        """(N, S * r): adapter s's B in rows slices[s] and columns [s*r, (s+1)*r), zeros elsewhere,
        so that one GEMM writes every slice's update into its own rows only."""
        if len(self.adapted) == 1 and len(self.slices) == 1:
            return self.lora_B[self.adapted[0]]
        width = len(self.adapted) * self.rank
        rows = []
        for name, (start, stop) in self.slices.items():
            if name in self.lora_B:
                col = self.adapted.index(name) * self.rank
                rows.append(F.pad(self.lora_B[name], (col, width - col - self.rank)))
            else:
                rows.append(self.weight.new_zeros(stop - start, width))
        return torch.cat(rows, dim=0)

    def add_adapters(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out (..., N) = x W^T + b, plus the adapters' term of x (..., K)."""
        low = F.linear(self.lora_dropout(x), self.stacked_A()) * self.scaling  # (..., S * r)
        return base_out + F.linear(low, self.block_B())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, F.linear(x, self.weight, self.bias))

    def delta_weight(self) -> torch.Tensor:
        """(N, K) float32: what merging adds to the weight, scaling * B_block @ A_stacked."""
        return self.scaling * (self.block_B().float() @ self.stacked_A().float())

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's (unchanged) weight and bias Parameters."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def layer_slices(parent: nn.Module, child: str, linear: nn.Linear) -> dict:
    """The output-row layout of `parent.<child>` named as Hugging Face names its parts.

    qkv: [q | k | v], sized by the parent's num_heads / num_kv_heads / head_dim (GQA) or thirds;
    gate_up: [gate | up] halves; any other Linear: one slice named `child`.
    """
    n = linear.out_features
    if child == "qkv":
        head_dim = getattr(parent, "head_dim", None)
        kv_heads = getattr(parent, "num_kv_heads", None)
        if head_dim is not None and kv_heads is not None:
            q, kv = parent.num_heads * head_dim, kv_heads * head_dim
        else:
            q = kv = n // 3
        if q + 2 * kv != n:
            raise ValueError(f"model: cannot split the fused qkv layer of {type(parent).__name__} ({n} rows)")
        return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, n)}
    if child == "gate_up":
        return {"gate_proj": (0, n // 2), "up_proj": (n // 2, n)}
    return {child: (0, n)}


def _check_arguments(rank, alpha, dropout, targets, include) -> tuple:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a positive finite number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in KNOWN_TARGETS]
    if not targets or unknown:
        raise ValueError(f"targets: expected names among {list(KNOWN_TARGETS)}, got unknown {unknown or 'nothing'}")
    if include is not None and not isinstance(include, str):
        raise TypeError(f"include: expected a module-path substring (str) or None, got {type(include).__name__}")
    return targets


def apply_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, include: str | None = None) -> int:
    """Adds LoRA adapters to the Linear layers of `model` named by `targets` (whose module path
    contains `include`, when given) and freezes every other parameter. Returns the number of
    Linear layers adapted (a fused qkv with q and v adapters counts once)."""
    targets = _check_arguments(rank, alpha, dropout, targets, include)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model: already has LoRA adapters (merge_lora it first)")
    chosen = []
    for path, parent in model.named_modules():
        for child, linear in parent.named_children():
            if type(linear) is not nn.Linear:
                continue
            full = f"{path}.{child}" if path else child
            if include is not None and include not in full:
                continue
            slices = layer_slices(parent, child, linear)
            wanted = [name for name in slices if name in targets]
            if wanted:
                chosen.append((parent, child, linear, slices, wanted))
    if not chosen:
        where = f" under modules matching include={include!r}" if include is not None else ""
        raise ValueError(f"targets: no Linear layer of {type(model).__name__} matched {list(targets)}{where}")
    for param in model.parameters():
        param.requires_grad_(False)
    for parent, child, linear, slices, wanted in chosen:
        setattr(parent, child, LoRALinear(linear, slices, wanted, rank, float(alpha), float(dropout)))
    return len(chosen)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter Parameter (A and B of each adapted slice), in module order."""
    return [p for _, m in lora_layers(model) for p in (*m.lora_A.values(), *m.lora_B.values())]


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters only: {"<layer>.lora_A.<target>": (r, K), "<layer>.lora_B.<target>": (rows, r)}."""
    return {key: value for key, value in model.state_dict().items() if ".lora_A." in key or ".lora_B." in key}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its weight in place (W[rows] += alpha/rank * B @ A, computed in
    float32) and puts plain nn.Linear layers back, so that the model saves in the usual layout.
    The base parameters keep their requires_grad (frozen by apply_lora). Returns model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA adapters to merge (apply_lora adds them)")
    for name, layer in layers:
        # one rounding to the weight's dtype (bf16 weights would lose a pre-rounded delta)
        layer.weight.copy_((layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to_linear())
    return model
