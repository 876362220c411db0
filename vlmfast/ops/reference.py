"""Plain-PyTorch references of every vlmfast op.

They are the test oracle (run in float64) and the fallback for anything the kernels do not
accelerate. Written for clarity, not speed: each follows the formula in API.md line by line.
"""

import torch


# ----------------------------------------------------------------------------- rotary embedding

def _table_view(table: torch.Tensor, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """(L, half) viewed so it broadcasts against x[..., :half] with L at seq_dim."""
    trailing = x.dim() - 1 - seq_dim - 1  # dims between the sequence and the head dim
    return table.reshape(table.shape[0], *([1] * trailing), table.shape[1])


def apply_rotary_emb(x, cos, sin, interleaved: bool = False, seq_dim: int = -2) -> torch.Tensor:
    """out_a = x_a cos - x_b sin, out_b = x_b cos + x_a sin over the pairs (a, b) of the first
    R = 2 * cos.shape[-1] head dims; dims from R on pass through. Computed in the promoted dtype
    of x and the tables, returned in x's dtype."""
    seq_dim = seq_dim % x.dim()
    half = cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    c = _table_view(cos, x, seq_dim).to(compute)
    s = _table_view(sin, x, seq_dim).to(compute)
    rotated, rest = x[..., : 2 * half].to(compute), x[..., 2 * half :]
    if interleaved:
        xa, xb = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((xa * c - xb * s, xb * c + xa * s), dim=-1).flatten(-2)
    else:
        xa, xb = rotated[..., :half], rotated[..., half:]
        out = torch.cat((xa * c - xb * s, xb * c + xa * s), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def rotary_table_grads(grad, x, half: int, interleaved: bool = False, seq_dim: int = -2):
    """Gradients of apply_rotary_emb with respect to cos and sin, float32 (or float64) (L, half):
    d cos = sum g_a x_a + g_b x_b, d sin = sum g_b x_a - g_a x_b over every dim but L and the pair."""
    seq_dim = seq_dim % x.dim()
    compute = torch.promote_types(x.dtype, torch.float32)
    g, v = grad[..., : 2 * half].to(compute), x[..., : 2 * half].to(compute)
    if interleaved:
        ga, gb, xa, xb = g[..., 0::2], g[..., 1::2], v[..., 0::2], v[..., 1::2]
    else:
        ga, gb, xa, xb = g[..., :half], g[..., half:], v[..., :half], v[..., half:]
    reduce = [d for d in range(x.dim() - 1) if d != seq_dim]
    d_cos = (ga * xa + gb * xb).sum(dim=reduce)
    d_sin = (gb * xa - ga * xb).sum(dim=reduce)
    return d_cos, d_sin


def rope_2d_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Qwen2-VL's vision frequencies for one axis, float32 (head_dim / 4,), formed with the same
    float32 operations as transformers so the tables agree with it to the last bit."""
    width = head_dim // 2
    exponents = torch.arange(0, width, 2, dtype=torch.float32, device=device) / width
    return 1.0 / (theta**exponents)


def rope_2d(positions, head_dim: int, theta: float = 10000.0, dtype=torch.float32):
    """(cos, sin), each (N, head_dim / 2): angles [row * inv_freq, col * inv_freq]."""
    inv_freq = rope_2d_inv_freq(head_dim, theta, positions.device).to(dtype)
    angles = (positions.to(dtype)[:, :, None] * inv_freq).flatten(1)  # (N, 2 * head_dim / 4)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------- patch embedding

def normalize_images(images, mean=None, std=None, dtype=None) -> torch.Tensor:
    """uint8 (B, H, W, C) or float (B, C, H, W) -> float (B, C, H, W) in `dtype` (default: the
    images' float dtype, float32 for uint8): uint8 is scaled by 1/255; then (x - mean) / std per
    channel when mean/std (length C) are given."""
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).to(dtype or torch.float32) / 255.0
    else:
        x = images.to(dtype or images.dtype)
    if mean is not None:
        shape = (1, -1, 1, 1)
        x = (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)) / torch.as_tensor(
            std, dtype=x.dtype, device=x.device
        ).view(shape)
    return x


def patch_embed(images, weight, bias=None, mean=None, std=None) -> torch.Tensor:
    """(B, N, D) = conv2d(normalised, weight, bias, stride=p).flatten(2).transpose(1, 2), computed
    in weight's dtype; weight (D, C, p, p)."""
    x = normalize_images(images, mean, std, weight.dtype)
    patch = weight.shape[-1]
    return torch.nn.functional.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C * p * p): one row per patch in raster order, columns ordered
    (c, i, j) like a flattened Conv2d weight (D, C, p, p)."""
    b, c, h, w = x.shape
    rows = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return rows.reshape(b * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(rows: torch.Tensor, batch: int, channels: int, height: int, width: int, patch: int):
    """The inverse of patchify: (B * N, C * p * p) -> (B, C, H, W)."""
    grid = rows.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def patch_gather(images, patch: int, scale, shift, dtype) -> torch.Tensor:
    """Normalised patches (B * N, C * p * p) in `dtype`: x * scale[c] + shift[c], x the raw
    image value (uint8 (B, H, W, C) or float (B, C, H, W))."""
    x = images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images
    compute = torch.promote_types(scale.dtype, torch.float32)
    x = x.to(compute) * scale.to(compute).view(1, -1, 1, 1) + shift.to(compute).view(1, -1, 1, 1)
    return patchify(x, patch).to(dtype)


# ----------------------------------------------------------------------------- attention

def _attention_math(q, k, v, bias=None, scale=None, is_causal=False):
    """softmax(scale q k^T + bias, causal top-left) v in q's dtype, and the natural-log lse.
    q (..., H, L, E), k/v (..., Hkv, S, E), H a multiple of Hkv (query head h reads kv head
    h // (H / Hkv)). A row with no key to attend gives out = 0 and lse = -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if is_causal:
        length, keys = q.shape[-2], k.shape[-2]
        allowed = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    empty = (scores == float("-inf")).all(dim=-1, keepdim=True)
    # Softmax of an all -inf row would be NaN: give it zeros (and zero gradients) instead.
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v, torch.logsumexp(scores, dim=-1)


def _attention_bias(attn_mask, dtype):
    """A bool mask (True takes part) or a float mask (added) as an additive float mask."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
    return torch.where(attn_mask, zero, torch.full_like(zero, float("-inf")))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, rotary=None):
    """torch's SDPA formula computed in the inputs' dtype (no dropout): (..., H, L, E) queries,
    (..., Hkv, S, E) keys and values (Hkv = H unless enable_gqa), a bool or float mask
    broadcastable to (..., H, L, S), rotary = (cos, sin) (L, R/2) applied to query and key first.
    Rows with no key to attend give zeros."""
    if dropout_p:
        raise ValueError("reference attention has no dropout")
    if rotary is not None:
        query = apply_rotary_emb(query, *rotary)
        key = apply_rotary_emb(key, *rotary)
    bias = _attention_bias(attn_mask, query.dtype)
    return _attention_math(query, key, value, bias, scale, is_causal)[0]


def attention_forward(q, k, v, bias, scale, is_causal):
    """The reference backend of vlmfast::attention_fwd: (out in q's dtype, lse float32 (B, H, L)),
    computed in float32 (float64 for float64 input)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    out, lse = _attention_math(q.to(compute), k.to(compute), v.to(compute), bias, scale, is_causal)
    return out.to(q.dtype), lse.to(torch.promote_types(torch.float32, lse.dtype))


def attention_backward(grad_out, q, k, v, out, lse, bias, scale, is_causal):
    """The reference backend of vlmfast::attention_bwd, written as the kernels compute it:
    P = exp(scale q k^T + bias - lse), D = rowsum(dO * O), dS = P * (dP - D), dq = scale dS k,
    dk = scale dS^T q, dv = P^T dO; dk, dv summed over each GQA group."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32, g32, o32 = (t.to(compute) for t in (q, k, v, grad_out, out))
    group = q.shape[-3] // k.shape[-3]
    kr, vr = k32.repeat_interleave(group, dim=-3), v32.repeat_interleave(group, dim=-3)
    scores = (q32 @ kr.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute)
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no key (lse = -inf) has P = 0: exp(s - inf) = 0 for every s.
    safe_lse = torch.where(lse == float("-inf"), float("inf"), lse.to(compute))
    probs = torch.exp(scores - safe_lse[..., None])
    d_value = probs.transpose(-1, -2) @ g32
    d_probs = g32 @ vr.transpose(-1, -2)
    delta = (g32 * o32).sum(-1, keepdim=True)
    d_scores = probs * (d_probs - delta)
    dq = scale * (d_scores @ kr)
    dk = scale * (d_scores.transpose(-1, -2) @ q32)

    def per_kv_head(t):
        return t.unflatten(-3, (k.shape[-3], group)).sum(-3)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(d_value).to(v.dtype)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, is_causal=False, scale=None, rotary=None):
    """Packed (T, H, E) / (T, Hkv, E) sequences split at cu_seqlens, each attended alone with
    scaled_dot_product_attention (GQA when Hkv < H); rotary tables (T, R/2) per packed token."""
    if rotary is not None:
        q = apply_rotary_emb(q, *rotary, seq_dim=0)
        k = apply_rotary_emb(k, *rotary, seq_dim=0)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out[start:end] = _attention_math(*piece, None, scale, is_causal)[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- contrastive losses

def _unit_rows(x, normalize: bool = True) -> torch.Tensor:
    """x / max(||x||, 1e-12) row by row (torch.nn.functional.normalize) when `normalize`."""
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12) if normalize else x


def contrastive_logits(image_features, text_features, logit_scale, normalize: bool = True):
    """(B, B) logits = logit_scale * n(img) @ n(txt).T in the features' dtype, as open_clip forms
    them (a 0-dim scale does not change the dtype)."""
    a, b = _unit_rows(image_features, normalize), _unit_rows(text_features, normalize)
    return logit_scale.reshape(()) * a @ b.T


def infonce_loss(image_features, text_features, logit_scale, normalize: bool = True):
    """open_clip's ClipLoss: (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2."""
    logits = contrastive_logits(image_features, text_features, logit_scale, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize: bool = True):
    """open_clip's SigLipLoss: -sum(logsigmoid(labels * logits)) / B, labels = 2I - 1,
    logits = logit_scale * n(img) @ n(txt).T + logit_bias."""
    logits = contrastive_logits(image_features, text_features, logit_scale, normalize)
    logits = logits + logit_bias.reshape(())
    labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / logits.shape[0]


# The materialised forward / backward of the fused kernels: the fallback of the vlmfast::infonce_*
# and vlmfast::siglip_* custom ops. a, b are the (already normalised) features, scale and bias
# 0-dim; computed in float32 (float64 for float64 features).

def _compute_dtype(a):
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def infonce_forward_stats(a, b, scale):
    """(loss, row_lse (B,), col_lse (B,)) of logits = scale * a @ b.T."""
    dtype = _compute_dtype(a)
    logits = scale.to(dtype) * (a.to(dtype) @ b.to(dtype).T)
    row_lse, col_lse = logits.logsumexp(1), logits.logsumexp(0)
    diag = logits.diagonal()
    # Per-row terms first: near a loss of 0 each sum alone is ~B * scale and would cancel.
    loss = ((row_lse - diag) + (col_lse - diag)).sum() / (2 * a.shape[0])
    return loss, row_lse, col_lse


def _feature_grads(g, a, b, scale, dots):
    # d a = s G b, d b = s G^T a, d s = sum G * (a . b)
    dtype = g.dtype
    a, b, s = a.to(dtype), b.to(dtype), scale.to(dtype)
    return (s * g @ b).to(a.dtype), (s * g.T @ a).to(b.dtype), (g * dots).sum()


def infonce_grads(grad, a, b, scale, row_lse, col_lse):
    """(d a, d b, d scale) of grad * loss: G = grad (P + Q - 2I) / (2B), P / Q the row / column
    softmaxes of the logits."""
    dtype = _compute_dtype(a)
    dots = a.to(dtype) @ b.to(dtype).T
    logits = scale.to(dtype) * dots
    p = torch.exp(logits - row_lse.to(dtype)[:, None])
    q = torch.exp(logits - col_lse.to(dtype)[None, :])
    eye = torch.eye(a.shape[0], dtype=dtype, device=a.device)
    g = grad.to(dtype) * (p + q - 2 * eye) / (2 * a.shape[0])
    da, db, ds = _feature_grads(g, a, b, scale, dots)
    return da.to(a.dtype), db.to(b.dtype), ds


def siglip_forward_loss(a, b, scale, bias):
    """The SigLIP loss of already-normalised features."""
    dtype = _compute_dtype(a)
    return siglip_loss(a.to(dtype), b.to(dtype), scale.to(dtype), bias.to(dtype), normalize=False)


def siglip_grads(grad, a, b, scale, bias):
    """(d a, d b, d scale, d bias) of grad * loss: G = grad (sigmoid(logits) - I) / B."""
    dtype = _compute_dtype(a)
    dots = a.to(dtype) @ b.to(dtype).T
    logits = scale.to(dtype) * dots + bias.to(dtype)
    eye = torch.eye(a.shape[0], dtype=dtype, device=a.device)
    g = grad.to(dtype) * (torch.sigmoid(logits) - eye) / a.shape[0]
    da, db, ds = _feature_grads(g, a, b, scale, dots)
    return da.to(a.dtype), db.to(b.dtype), ds, g.sum()


# ----------------------------------------------------------------------------- linear cross-entropy
# The materialised version of vlmfast.ops.linear_cross_entropy: the (N, V) logits in float32
# (float64 for float64 input). "mean" over zero non-ignored labels gives 0 (torch gives NaN).

def _lce_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def lce_logits(hidden, weight, bias=None, softcap=None):
    """(N, V) logits = hidden @ weight.T (+ bias), then softcap * tanh(logits / softcap)."""
    dtype = _lce_dtype(hidden)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def lce_valid(labels, ignore_index: int, vocab: int):
    """(N,) bool: the rows that have a loss (label not ignore_index and in [0, V))."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def lce_reduce(loss_rows, valid, reduction: str):
    """sum / mean over the valid rows (mean of none is 0) or the rows themselves."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / valid.sum().clamp(min=1).to(total.dtype) if reduction == "mean" else total


def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, softcap=None):
    """F.cross_entropy(hidden @ weight.T + bias, labels) in float32 on (N, D) hidden, (V, D) weight."""
    import torch.nn.functional as F

    logits = lce_logits(hidden, weight, bias, softcap)
    valid = lce_valid(labels, ignore_index, weight.shape[0])
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    rows = F.cross_entropy(logits, safe, reduction="none", label_smoothing=label_smoothing)
    return lce_reduce(torch.where(valid, rows, torch.zeros_like(rows)), valid, reduction)


def lce_rows(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float):
    """(loss_rows, lse), (N,) each: loss_i = lse_i - (1 - eps) z_iy - eps / V sum_v z_iv, 0 when ignored."""
    logits = lce_logits(hidden, weight, bias)
    valid = lce_valid(labels, ignore_index, weight.shape[0])
    lse = logits.logsumexp(-1)
    target = logits.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    eps = label_smoothing
    rows = lse - (1 - eps) * target - eps / weight.shape[0] * logits.sum(-1)
    return torch.where(valid, rows, torch.zeros_like(rows)), lse


def lce_grads(hidden, weight, bias, labels, row_scale, ignore_index: int, label_smoothing: float):
    """(d hidden, d weight, d bias) of sum_i row_scale_i * loss_i: G = s (softmax - (1 - eps) onehot
    - eps / V) on valid rows; d hidden = G W, d weight = G^T hidden, d bias = sum_i G_i (float32)."""
    logits = lce_logits(hidden, weight, bias)
    vocab = weight.shape[0]
    valid = lce_valid(labels, ignore_index, vocab)
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), vocab).to(logits.dtype)
    g = logits.softmax(-1) - (1 - label_smoothing) * onehot - label_smoothing / vocab
    g = g * torch.where(valid, row_scale.to(g.dtype), torch.zeros_like(row_scale, dtype=g.dtype))[:, None]
    grad_hidden = (g @ weight.to(g.dtype)).to(hidden.dtype)
    grad_weight = (g.T @ hidden.to(g.dtype)).to(weight.dtype)
    return grad_hidden, grad_weight, g.sum(0)


# ----------------------------------------------------------------------------- linear (+ activation)

LINEAR_ACTIVATIONS = {
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),  # OpenAI CLIP
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),  # SigLIP
    "gelu": torch.nn.functional.gelu,  # erf form (ViT)
}


def linear(x, weight, bias=None, activation=None) -> torch.Tensor:
    """act(x (..., K) @ weight (N, K)^T + bias (N,)) -> (..., N); activation None or a key of
    LINEAR_ACTIVATIONS."""
    z = torch.nn.functional.linear(x, weight, bias)
    return z if activation is None else LINEAR_ACTIVATIONS[activation](z)


# ----------------------------------------------------------------------------- SwiGLU

def swiglu(gate_up) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 I) = [gate | up] -> (..., I): the eager composite,
    rounded where it rounds (after silu, after the product) in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_backward(grad, gate_up) -> torch.Tensor:
    """The gradient of swiglu for grad (..., I): (..., 2 I) = [grad * up * silu'(gate) |
    grad * silu(gate)], silu'(g) = sigma(g) (1 + g (1 - sigma(g))), rounded as autograd rounds the
    eager composite (each product, then silu's slope applied in float32)."""
    gate, up = gate_up.chunk(2, dim=-1)
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    g = gate.to(compute)
    sigma = torch.sigmoid(g)
    d_up = grad * torch.nn.functional.silu(gate)
    d_gate = (grad * up).to(compute) * (sigma * (1 + g * (1 - sigma)))
    return torch.cat((d_gate.to(gate_up.dtype), d_up), dim=-1)
